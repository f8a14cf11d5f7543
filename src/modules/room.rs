//! The room fold: validates one input record and folds its event through
//! every module of the topology, producing the room's next state and the
//! ordered list of effective changes. Still pure: the runtime supplies the
//! current state and persists what comes out.

use std::sync::Arc;

use super::input::{Input, InputHeaders};
use super::timers::{self, TimerOp};
use super::{DynModule, Limits, ModuleState, RejectKind, Rejection};
use crate::path::Path;
use crate::proto::omni::{Lease, RoomState, Timer};
use crate::proto::tecate::room_event::Kind;
use crate::proto::tecate::RoomEvent;
use crate::proto::{millis_of, timestamp_from_millis};

/// The module name of the change a room close makes.
pub const ROOM_MODULE: &str = "room";

/// One effective change: a module's full state after it, at a room version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub version: u64,
    pub module: &'static str,
    pub state_json: String,
}

/// What folding one event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoldOutcome {
    /// Effective changes in order; empty for a no-op.
    pub changes: Vec<Change>,
    /// True when the event closed the room (its state is now empty).
    pub closed: bool,
    /// True when the room's timers changed (set, replaced or cancelled).
    pub timers_changed: bool,
}

/// What firing a due timer did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fired {
    /// The timer, its deadline the one it fell due at.
    pub timer: Timer,
    /// The timer fold's change; `None` for a no-op.
    pub change: Option<Change>,
}

/// A room's state with its module states kept decoded, so the events after
/// the first fold without parsing the room's JSON again.
#[derive(Default)]
pub struct LiveRoom {
    state: RoomState,
    /// Per module of the folder, in its order; `None` until first needed.
    decoded: Vec<Option<ModuleState>>,
}

impl LiveRoom {
    pub fn new(state: RoomState) -> LiveRoom {
        LiveRoom { state, decoded: Vec::new() }
    }

    pub fn state(&self) -> &RoomState {
        &self.state
    }
}

/// A topology's modules and limits, ready to fold records.
#[derive(Clone)]
pub struct RoomFolder {
    modules: Vec<Arc<dyn DynModule>>,
    /// Each module's empty-state JSON, computed once.
    empty: Vec<String>,
    limits: Limits,
}

impl RoomFolder {
    pub fn new(modules: Vec<Arc<dyn DynModule>>, limits: Limits) -> RoomFolder {
        let empty = modules.iter().map(|m| m.empty_json()).collect();
        RoomFolder { modules, empty, limits }
    }

    pub fn modules(&self) -> &[Arc<dyn DynModule>] {
        &self.modules
    }

    /// Checks a raw record against the limits and decodes its value. The key
    /// comes back as is, checked to be a room path unless `known` says it is
    /// one already checked (a room the caller holds): valid path text is
    /// canonical, so it needs no re-printing, and parsing it is worth
    /// skipping on the hot path.
    pub fn decode<'k>(
        &self,
        key: Option<&'k [u8]>,
        value: Option<&[u8]>,
        headers: InputHeaders<'_>,
        known: impl FnOnce(&str) -> bool,
    ) -> Result<(&'k str, Input), Rejection> {
        let size = key.map_or(0, <[u8]>::len) + value.map_or(0, <[u8]>::len);
        if size > self.limits.max_record_bytes {
            return Err(Rejection::new(
                RejectKind::OverLimit,
                format!("record is {size} bytes, over the {}-byte limit", self.limits.max_record_bytes),
            ));
        }
        let key = key.ok_or_else(|| Rejection::new(RejectKind::InvalidKey, "record has no key"))?;
        let key =
            std::str::from_utf8(key).map_err(|_| Rejection::new(RejectKind::InvalidKey, "record key is not UTF-8"))?;
        if !known(key) {
            Path::parse_room(key).map_err(|e| Rejection::new(RejectKind::InvalidKey, e.to_string()))?;
        }
        let value = value.ok_or_else(|| Rejection::new(RejectKind::Undecodable, "record has no value"))?;
        Ok((key, Input::decode(value, headers)?))
    }

    /// Folds `event` into `state`. On a rejection `state` is left untouched,
    /// so an event is applied whole or not at all.
    pub fn fold(&self, state: &mut RoomState, event: &RoomEvent) -> Result<FoldOutcome, Rejection> {
        let mut room = LiveRoom::new(std::mem::take(state));
        let outcome = self.fold_live(&mut room, event, None, millis_of(event.occurred_at.as_ref()));
        *state = room.state;
        outcome
    }

    /// [`RoomFolder::fold`] on a room that keeps its module states decoded
    /// from one event to the next, with the lease its record carries;
    /// timers it sets fall due counting from `now_ms`.
    pub fn fold_live(
        &self,
        room: &mut LiveRoom,
        event: &RoomEvent,
        lease: Option<&Lease>,
        now_ms: i64,
    ) -> Result<FoldOutcome, Rejection> {
        if matches!(event.kind, Some(Kind::RoomClosed(_))) {
            return Ok(self.close(room, event));
        }
        room.decoded.resize_with(self.modules.len(), || None);
        let mut next_states = Vec::new();
        let mut timer_ops: Vec<(usize, Vec<TimerOp>)> = Vec::new();
        for (index, module) in self.modules.iter().enumerate() {
            if !module.reacts_to(event) {
                continue;
            }
            let current = self.decoded(room, index)?;
            let limits = &self.limits;
            let ops = guarded(module.name(), || Ok(module.timers(current, event, lease)))?;
            if !ops.is_empty() {
                timer_ops.push((index, ops));
            }
            if let Some(next) = guarded(module.name(), || module.fold_state(current, event, limits))? {
                next_states.push((index, next));
            }
        }
        self.check_state_size(&room.state, &next_states)?;
        let mut timers = room.state.timers.clone();
        let mut timers_changed = false;
        for (index, ops) in &timer_ops {
            timers_changed |= timers::apply(&mut timers, self.modules[*index].name(), ops, now_ms)?;
        }
        if timers_changed {
            room.state.timers = timers;
        }
        let mut outcome = self.apply(room, next_states, event.occurred_at);
        outcome.timers_changed = timers_changed;
        Ok(outcome)
    }

    /// A module's decoded state in `room`, decoded from its JSON when first needed.
    fn decoded<'r>(&self, room: &'r mut LiveRoom, index: usize) -> Result<&'r mut ModuleState, Rejection> {
        let module = &self.modules[index];
        match &mut room.decoded[index] {
            Some(decoded) => Ok(decoded),
            slot => {
                let json = room.state.modules.get(module.name()).map(String::as_str);
                Ok(slot.insert(guarded(module.name(), || module.decode_state(json))?))
            }
        }
    }

    /// Takes the modules' next states into the room, one version each.
    fn apply(
        &self,
        room: &mut LiveRoom,
        next_states: Vec<(usize, (ModuleState, String))>,
        at: Option<crate::proto::Timestamp>,
    ) -> FoldOutcome {
        let state = &mut room.state;
        let mut changes = Vec::with_capacity(next_states.len());
        for (index, (decoded, json)) in next_states {
            let module = &self.modules[index];
            state.version += 1;
            if json == self.empty[index] {
                state.modules.remove(module.name());
            } else {
                state.modules.insert(module.name().to_owned(), json.clone());
            }
            room.decoded[index] = Some(decoded);
            changes.push(Change { version: state.version, module: module.name(), state_json: json });
        }
        if !changes.is_empty() {
            state.updated_at = at;
            state.closed = false;
        }
        FoldOutcome { changes, closed: false, timers_changed: false }
    }

    /// The timer fold: fires `module`'s timer `name`, which fell due at
    /// `due_ms`, and removes it from the room. `None` when the room holds no
    /// such timer. On a rejection (the module panicked, say) the room is
    /// left as it was; [`RoomFolder::drop_timer`] then gets rid of the timer.
    pub fn fire(&self, room: &mut LiveRoom, module: &str, name: &str, due_ms: i64) -> Result<Option<Fired>, Rejection> {
        let Some(position) = room.state.timers.iter().position(|t| t.module == module && t.name == name) else {
            return Ok(None);
        };
        let timer = Timer { deadline_ms: due_ms, ..room.state.timers[position].clone() };
        let mut next_states = Vec::new();
        if let Some(index) = self.modules.iter().position(|m| m.name() == module) {
            room.decoded.resize_with(self.modules.len(), || None);
            let current = self.decoded(room, index)?;
            let handler = &self.modules[index];
            if let Some(next) = guarded(module, || handler.fire_state(current, &timer))? {
                next_states.push((index, next));
            }
            self.check_state_size(&room.state, &next_states)?;
        }
        room.state.timers.remove(position);
        let outcome = self.apply(room, next_states, Some(timestamp_from_millis(due_ms)));
        Ok(Some(Fired { timer, change: outcome.changes.into_iter().next() }))
    }

    /// Removes a timer whose fold was refused; true when the room held it.
    pub fn drop_timer(&self, room: &mut LiveRoom, module: &str, name: &str) -> bool {
        let before = room.state.timers.len();
        room.state.timers.retain(|t| t.module != module || t.name != name);
        room.state.timers.len() != before
    }

    /// Refuses changes that would take the room's state past its byte limit.
    fn check_state_size(&self, state: &RoomState, next: &[(usize, (ModuleState, String))]) -> Result<(), Rejection> {
        if next.is_empty() {
            return Ok(());
        }
        let held = |name: &str| state.modules.get(name).map_or(0, |json| name.len() + json.len());
        let current: usize = state.modules.iter().map(|(name, json)| name.len() + json.len()).sum();
        let mut size = current;
        for (index, (_, json)) in next {
            let name = self.modules[*index].name();
            size = size - held(name) + name.len() + json.len();
        }
        // A room already past a lowered limit may still shrink.
        if size > self.limits.max_room_state_bytes && size > current {
            return Err(Rejection::new(
                RejectKind::OverLimit,
                format!(
                    "the room's state would be {size} bytes, over the {}-byte limit",
                    self.limits.max_room_state_bytes
                ),
            ));
        }
        Ok(())
    }

    /// A close clears every module as one change; the version survives so a
    /// reopened room continues from it. Closing an empty room is a no-op.
    fn close(&self, room: &mut LiveRoom, event: &RoomEvent) -> FoldOutcome {
        let state = &mut room.state;
        let timers_changed = !state.timers.is_empty();
        state.timers.clear();
        if state.modules.is_empty() {
            return FoldOutcome { changes: Vec::new(), closed: false, timers_changed };
        }
        state.modules.clear();
        room.decoded.clear();
        state.version += 1;
        state.closed = true;
        state.updated_at = event.occurred_at;
        FoldOutcome {
            changes: vec![Change { version: state.version, module: ROOM_MODULE, state_json: "{}".to_owned() }],
            closed: true,
            timers_changed,
        }
    }

    /// Every module's current JSON state, the empty state for modules that hold none.
    pub fn module_states<'a>(&'a self, state: &'a RoomState) -> impl Iterator<Item = (&'static str, String)> + 'a {
        self.modules.iter().zip(&self.empty).map(move |(m, empty)| {
            let json = state.modules.get(m.name()).unwrap_or(empty).clone();
            (m.name(), json)
        })
    }
}

/// Runs a module's code, turning a panic into a rejection of the event: one
/// module's bug dead-letters the events that trigger it instead of stopping
/// the job (which would meet the same event again after every restart).
fn guarded<T>(module: &str, call: impl FnOnce() -> Result<T, Rejection>) -> Result<T, Rejection> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a non-text panic".to_owned());
        Err(Rejection::new(RejectKind::ModulePanic, format!("module {module} panicked: {what}")))
    })
}

/// Event constructors shared by the module tests.
#[cfg(test)]
pub(crate) mod test_events {
    use crate::proto::tecate::{room_event::Kind, *};
    use crate::proto::Timestamp;

    /// 2026-11-27T10:00:00Z
    pub const AT: Timestamp = Timestamp { seconds: 1_795_773_600, nanos: 0 };

    pub fn event(kind: Kind) -> RoomEvent {
        RoomEvent { event_id: "e".into(), occurred_at: Some(AT), kind: Some(kind) }
    }
    pub fn start(id: &str, by: &str) -> RoomEvent {
        event(Kind::RecordingStarted(RecordingStarted { recording_id: id.into(), started_by: by.into() }))
    }
    pub fn stop(id: &str, reason: &str) -> RoomEvent {
        event(Kind::RecordingStopped(RecordingStopped { recording_id: id.into(), reason: reason.into() }))
    }
    pub fn tag_set(key: &str, value: &str) -> RoomEvent {
        event(Kind::TagSet(TagSet { key: key.into(), value: value.into() }))
    }
    pub fn tag_remove(key: &str) -> RoomEvent {
        event(Kind::TagRemoved(TagRemoved { key: key.into() }))
    }
    pub fn close() -> RoomEvent {
        event(Kind::RoomClosed(RoomClosed {}))
    }
}

#[cfg(test)]
mod tests {
    use super::test_events::*;
    use super::*;
    use crate::modules::Registry;
    use prost::Message;

    fn folder() -> RoomFolder {
        let names = vec!["recording".to_owned(), "tags".to_owned()];
        RoomFolder::new(Registry::with_builtins().select(&names).unwrap(), Limits::default())
    }

    #[test]
    fn each_effective_change_bumps_the_version_by_one_and_no_ops_do_not() {
        let f = folder();
        let mut room = RoomState::default();
        let events = [
            start("rec1", "u1"),
            tag_set("topic", "physics"),
            tag_set("topic", "chemistry"),
            tag_remove("absent"),
            start("rec1", "u1"),
            stop("rec1", "done"),
        ];
        let versions: Vec<Vec<u64>> =
            events.iter().map(|e| f.fold(&mut room, e).unwrap().changes.iter().map(|c| c.version).collect()).collect();
        assert_eq!(versions, vec![vec![1], vec![2], vec![3], vec![], vec![], vec![4]]);
        assert_eq!(room.version, 4);
        assert_eq!(room.modules["tags"], r#"{"topic":"chemistry"}"#);
    }

    #[test]
    fn close_clears_everything_as_one_room_change_and_the_version_survives() {
        let f = folder();
        let mut room = RoomState::default();
        f.fold(&mut room, &start("r", "u")).unwrap();
        f.fold(&mut room, &tag_set("k", "v")).unwrap();
        let out = f.fold(&mut room, &close()).unwrap();
        assert!(out.closed && room.closed);
        assert_eq!(out.changes, vec![Change { version: 3, module: ROOM_MODULE, state_json: "{}".into() }]);
        assert!(room.modules.is_empty());
        // A second close is a no-op; a reopened room continues the version.
        assert!(f.fold(&mut room, &close()).unwrap().changes.is_empty());
        assert_eq!(f.fold(&mut room, &tag_set("k", "v")).unwrap().changes[0].version, 4);
        assert!(!room.closed);
    }

    #[test]
    fn a_rejected_event_leaves_the_state_untouched() {
        let f = RoomFolder::new(
            Registry::with_builtins().select(&["tags".to_owned()]).unwrap(),
            Limits { max_tags_per_room: 1, ..Limits::default() },
        );
        let mut room = RoomState::default();
        f.fold(&mut room, &tag_set("a", "1")).unwrap();
        let before = room.clone();
        assert_eq!(f.fold(&mut room, &tag_set("b", "2")).unwrap_err().kind, RejectKind::OverLimit);
        assert_eq!(room, before);
    }

    #[test]
    fn an_event_that_would_take_the_state_past_its_byte_limit_is_rejected_whole() {
        let limits = Limits { max_room_state_bytes: 60, ..Limits::default() };
        let f = RoomFolder::new(Registry::with_builtins().select(&["tags".to_owned()]).unwrap(), limits);
        let mut room = RoomState::default();
        // "tags" + {"a":"0123456789"} = 4 + 18 bytes.
        f.fold(&mut room, &tag_set("a", "0123456789")).unwrap();
        f.fold(&mut room, &tag_set("b", "0123456789")).unwrap();
        let before = room.clone();
        let rejection = f.fold(&mut room, &tag_set("c", "0123456789012345678")).unwrap_err();
        assert_eq!(rejection.kind, RejectKind::OverLimit);
        assert!(rejection.message.contains("over the 60-byte limit"), "{}", rejection.message);
        assert_eq!(room, before);
        // Replacing a value with a shorter one shrinks the state: allowed.
        assert_eq!(f.fold(&mut room, &tag_set("a", "0")).unwrap().changes.len(), 1);
    }

    struct Panicky;

    impl crate::modules::Module for Panicky {
        type State = u64;
        fn name(&self) -> &'static str {
            "panicky"
        }
        fn fold(&self, state: &u64, event: &RoomEvent, _: &Limits) -> Result<Option<u64>, Rejection> {
            if matches!(event.kind, Some(Kind::RoomClosed(_))) {
                return Ok(None);
            }
            assert!(*state < 1, "a module bug");
            Ok(Some(state + 1))
        }
    }

    #[test]
    fn a_panicking_module_rejects_the_event_and_leaves_the_room_as_it_was() {
        let registry = Registry::with_builtins().register(Panicky);
        let names = ["tags".to_owned(), "panicky".to_owned()];
        let f = RoomFolder::new(registry.select(&names).unwrap(), Limits::default());
        let mut room = RoomState::default();
        f.fold(&mut room, &tag_set("k", "v")).unwrap();
        let before = room.clone();
        let rejection = f.fold(&mut room, &tag_set("k", "w")).unwrap_err();
        assert_eq!(rejection.kind, RejectKind::ModulePanic);
        assert!(rejection.message.contains("module panicky panicked: a module bug"), "{}", rejection.message);
        assert_eq!(room, before, "the tags change of the same event is not applied either");
    }

    #[test]
    fn a_module_cannot_take_a_reserved_or_registered_name() {
        struct Named(&'static str);
        impl crate::modules::Module for Named {
            type State = u64;
            fn name(&self) -> &'static str {
                self.0
            }
            fn fold(&self, _: &u64, _: &RoomEvent, _: &Limits) -> Result<Option<u64>, Rejection> {
                Ok(None)
            }
        }
        let tags = ["tags".to_owned()];
        for (name, error) in [
            ("tags", crate::modules::RegistryError::Registered("tags".into())),
            ("version", crate::modules::RegistryError::Reserved("version".into())),
            ("updated_at", crate::modules::RegistryError::Reserved("updated_at".into())),
            ("room", crate::modules::RegistryError::Reserved("room".into())),
        ] {
            let registry = Registry::with_builtins().register(Named(name));
            assert_eq!(registry.select(&tags).err(), Some(error), "{name}");
        }
        assert!(Registry::with_builtins().register(Named("other")).select(&tags).is_ok());
    }

    #[test]
    fn a_module_back_at_its_empty_state_is_dropped_from_the_room() {
        let f = folder();
        let mut room = RoomState::default();
        f.fold(&mut room, &tag_set("k", "v")).unwrap();
        let out = f.fold(&mut room, &tag_remove("k")).unwrap();
        assert_eq!(out.changes[0].state_json, "{}");
        assert!(room.modules.is_empty());
        let states: Vec<_> = f.module_states(&room).collect();
        assert_eq!(states, vec![("recording", r#"{"active":false}"#.to_owned()), ("tags", "{}".to_owned())]);
    }

    #[test]
    fn decode_rejects_bad_records_with_the_right_kind() {
        let f = folder();
        let good = tag_set("k", "v").encode_to_vec();
        let none = InputHeaders::default();
        let decode = |k: &'static [u8]| f.decode(Some(k), Some(&good), none, |_| false).map(|(key, _)| key);
        assert_eq!(decode(b"app/a/room/r").unwrap(), "app/a/room/r");
        assert_eq!(decode(br"app/a\/b/room/r").unwrap(), r"app/a\/b/room/r");
        assert_eq!(decode(b"app/a").unwrap_err().kind, RejectKind::InvalidKey);
        assert_eq!(
            f.decode(Some(b"app/a"), Some(&good), none, |key| key == "app/a").unwrap().0,
            "app/a",
            "a key the caller vouches for is not parsed again"
        );
        let kind = |k: Option<&[u8]>, v: Option<&[u8]>| f.decode(k, v, none, |_| false).unwrap_err().kind;
        assert_eq!(kind(None, Some(&good)), RejectKind::InvalidKey);
        assert_eq!(kind(Some(b"app/a"), Some(&good)), RejectKind::InvalidKey);
        assert_eq!(kind(Some(&[0xff, 0xfe]), Some(&good)), RejectKind::InvalidKey);
        assert_eq!(kind(Some(b"app/a/room/r"), Some(&[0xff, 0xff, 0xff])), RejectKind::Undecodable);
        assert_eq!(kind(Some(b"app/a/room/r"), None), RejectKind::Undecodable);
        assert_eq!(kind(Some(b"app/a/room/r"), Some(&[])), RejectKind::Undecodable);
        let big = vec![0u8; 64 * 1024];
        assert_eq!(kind(Some(b"app/a/room/r"), Some(&big)), RejectKind::OverLimit);
    }
}
