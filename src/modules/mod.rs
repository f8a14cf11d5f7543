//! Topology modules: the pure folds that turn room events into room state.
//!
//! A module owns one named slice of a room's state (`recording`, `tags`, …)
//! and folds events into it. Folds are pure functions of (state, event): they
//! do no I/O, so the runtime can run them inside a transaction, replay them,
//! and tests can drive them without Kafka. The runtime owns everything else.
//!
//! Adding a state type is one file here with a [`Module`] impl, one line in
//! [`Registry::with_builtins`], and the module's name in a topology file.
//! A module may also set timers ([`timers`]): its timer fold is as pure.

mod input;
mod recording;
mod room;
mod tags;
pub mod timers;

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::proto::omni::{Lease, Timer};
use crate::proto::tecate::RoomEvent;

pub use input::{Input, InputHeaders, KEEPALIVE_TYPE, LEASE_HEADER, TYPE_HEADER};
pub use recording::{Recording, RecordingState, HEARTBEAT_LOST, LEASE_TIMER};
pub use room::{Change, Fired, FoldOutcome, LiveRoom, RoomFolder, ROOM_MODULE};
pub use tags::Tags;
pub use timers::{TimerOp, TimerSpec};

/// Limits a fold enforces; records that break them are dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Most tags one room may hold.
    pub max_tags_per_room: usize,
    /// Longest tag key, in bytes.
    pub max_tag_key_bytes: usize,
    /// Longest tag value, in bytes.
    pub max_tag_value_bytes: usize,
    /// Largest input record (key plus value), in bytes.
    pub max_record_bytes: usize,
    /// Largest room state (every module's JSON and name, summed), in bytes.
    /// It bounds every changelog and broadcast record, so the job checks at
    /// start-up that the output topics take records of that size.
    pub max_room_state_bytes: usize,
    /// Memory for committed room states kept decoded between events, per
    /// instance, in bytes; past it the cache starts over.
    pub room_cache_bytes: usize,
    /// Memory for writes waiting for Redis, in bytes. Reached while Redis
    /// takes writes, consumption pauses until the backlog drained to three
    /// quarters of it. Past it, waiting writes keep only their room's path
    /// (re-read from the store when their turn comes, their change-stream
    /// entries dropped); past it by a quarter while Redis fails, the
    /// backlog is dropped and every room rewritten from the store once
    /// Redis is back.
    pub redis_backlog_bytes: usize,
    /// Most bytes of change-stream entries one room's Redis write carries;
    /// older entries past it are dropped, and the stream gets a marker that
    /// sends readers back to the snapshot.
    pub redis_write_bytes: usize,
    /// How long a closed room's change stream stays in Redis, in seconds.
    pub closed_stream_retention_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_tags_per_room: 256,
            max_tag_key_bytes: 128,
            max_tag_value_bytes: 4096,
            max_record_bytes: 64 * 1024,
            // Half the broker's default `max.message.bytes` (1 MiB), so a
            // broadcast record at the limit, with its path and event id,
            // fits a topic made with the broker's defaults.
            max_room_state_bytes: 512 * 1024,
            room_cache_bytes: 16 << 20,
            redis_backlog_bytes: 32 << 20,
            redis_write_bytes: 4 << 20,
            closed_stream_retention_secs: 24 * 3600,
        }
    }
}

/// Why a record was refused; the kind names the dead-letter header value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct Rejection {
    pub kind: RejectKind,
    pub message: String,
}

/// The kinds of refusal, as written in the `omni.error.kind` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectKind {
    /// The value is not a decodable Tecate event.
    Undecodable,
    /// The key is not a valid room path.
    InvalidKey,
    /// The record or the state it would produce breaks a configured limit.
    OverLimit,
    /// The event decodes but makes no sense (an empty tag key, say).
    InvalidEvent,
    /// The room's stored state could not be read back (a module changed its format).
    CorruptState,
    /// A module panicked while folding the event.
    ModulePanic,
    /// The broker refused a record the event produced (too large for the topic, say).
    ProductionRefused,
}

impl RejectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectKind::Undecodable => "undecodable",
            RejectKind::InvalidKey => "invalid_key",
            RejectKind::OverLimit => "over_limit",
            RejectKind::InvalidEvent => "invalid_event",
            RejectKind::CorruptState => "corrupt_state",
            RejectKind::ModulePanic => "module_panic",
            RejectKind::ProductionRefused => "production_refused",
        }
    }
}

impl std::fmt::Display for RejectKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Rejection {
    pub fn new(kind: RejectKind, message: impl Into<String>) -> Rejection {
        Rejection { kind, message: message.into() }
    }
}

/// A state type: a named, serialisable state and the pure fold over it.
///
/// `fold` returns `Ok(None)` for a no-op (nothing changes, nothing is
/// emitted), `Ok(Some(next))` for an effective change, or a [`Rejection`]
/// when the event must be dead-lettered instead.
pub trait Module: Send + Sync + 'static {
    /// The module's state; `Default` is the empty state of a new or closed room.
    type State: Default + Serialize + DeserializeOwned + PartialEq + Send + 'static;

    /// The name used in topology files, Redis fields and broadcast records.
    fn name(&self) -> &'static str;

    fn fold(&self, state: &Self::State, event: &RoomEvent, limits: &Limits) -> Result<Option<Self::State>, Rejection>;

    /// Whether `event` can concern this module at all. `false` skips decoding
    /// the state for it, which matters on the hot path; the default is `true`.
    fn reacts_to(&self, _event: &RoomEvent) -> bool {
        true
    }

    /// The timers `event` sets or cancels for this module, from its state
    /// before the event; `lease` is the omni lease its record carries, if
    /// any. Applied only when the event is not rejected, whether or not it
    /// changed the state. Called only for events it [`reacts_to`](Module::reacts_to);
    /// a room close cancels every timer by itself. The default sets none.
    fn timers(&self, _state: &Self::State, _event: &RoomEvent, _lease: Option<&Lease>) -> Vec<TimerOp> {
        Vec::new()
    }

    /// The timer fold: what this module's due `timer` does to its state, a
    /// pure function of the two (`timer.deadline_ms` is when it fell due).
    /// `None` is a no-op; the timer is gone either way. The default does nothing.
    fn on_timer(&self, _state: &Self::State, _timer: &Timer) -> Option<Self::State> {
        None
    }
}

/// A module's decoded state, its type erased so the runtime can hold the
/// states of different modules side by side.
pub struct ModuleState(Box<dyn Any + Send>);

/// A module with its state type erased. States are stored and published as
/// JSON, but kept decoded between events so a busy room does not parse its
/// JSON again for every event.
pub trait DynModule: Send + Sync {
    fn name(&self) -> &'static str;

    /// See [`Module::reacts_to`].
    fn reacts_to(&self, event: &RoomEvent) -> bool;

    /// Decodes a stored JSON state (`None` = empty).
    fn decode_state(&self, json: Option<&str>) -> Result<ModuleState, Rejection>;

    /// Folds `event` into `state`; on an effective change returns the next state and its JSON.
    fn fold_state(
        &self,
        state: &ModuleState,
        event: &RoomEvent,
        limits: &Limits,
    ) -> Result<Option<(ModuleState, String)>, Rejection>;

    /// The JSON of the empty state.
    fn empty_json(&self) -> String;

    /// See [`Module::timers`].
    fn timers(&self, state: &ModuleState, event: &RoomEvent, lease: Option<&Lease>) -> Vec<TimerOp>;

    /// Runs the timer fold; on an effective change returns the next state and its JSON.
    fn fire_state(&self, state: &ModuleState, timer: &Timer) -> Result<Option<(ModuleState, String)>, Rejection>;
}

impl<M: Module> DynModule for M {
    fn name(&self) -> &'static str {
        Module::name(self)
    }

    fn reacts_to(&self, event: &RoomEvent) -> bool {
        Module::reacts_to(self, event)
    }

    fn decode_state(&self, json: Option<&str>) -> Result<ModuleState, Rejection> {
        let state: M::State = match json {
            Some(json) => serde_json::from_str(json).map_err(|e| {
                Rejection::new(
                    RejectKind::CorruptState,
                    format!("stored {} state does not decode: {e}", Module::name(self)),
                )
            })?,
            None => M::State::default(),
        };
        Ok(ModuleState(Box::new(state)))
    }

    fn fold_state(
        &self,
        state: &ModuleState,
        event: &RoomEvent,
        limits: &Limits,
    ) -> Result<Option<(ModuleState, String)>, Rejection> {
        let current = own_state::<M>(self, state)?;
        Ok(changed(current, self.fold(current, event, limits)?))
    }

    fn empty_json(&self) -> String {
        to_json(&M::State::default())
    }

    fn timers(&self, state: &ModuleState, event: &RoomEvent, lease: Option<&Lease>) -> Vec<TimerOp> {
        match state.0.downcast_ref::<M::State>() {
            Some(current) => Module::timers(self, current, event, lease),
            None => Vec::new(),
        }
    }

    fn fire_state(&self, state: &ModuleState, timer: &Timer) -> Result<Option<(ModuleState, String)>, Rejection> {
        let current = own_state::<M>(self, state)?;
        Ok(changed(current, self.on_timer(current, timer)))
    }
}

fn own_state<'s, M: Module>(module: &M, state: &'s ModuleState) -> Result<&'s M::State, Rejection> {
    state.0.downcast_ref::<M::State>().ok_or_else(|| {
        Rejection::new(
            RejectKind::CorruptState,
            format!("the state handed to {} is another module's", Module::name(module)),
        )
    })
}

/// An effective change's next state with its JSON; `None` when it equals the current one.
fn changed<S: Serialize + PartialEq + Send + 'static>(current: &S, next: Option<S>) -> Option<(ModuleState, String)> {
    match next {
        Some(next) if next != *current => {
            let json = to_json(&next);
            Some((ModuleState(Box::new(next)), json))
        }
        _ => None,
    }
}

fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("module states serialise to JSON")
}

/// Names no module may take: the close's change ([`ROOM_MODULE`]), and the
/// fields every room snapshot carries beside its modules' states (a module
/// under one of them would overwrite the room's version in Redis).
pub const RESERVED_MODULE_NAMES: [&str; 3] = [ROOM_MODULE, "version", "updated_at"];

/// Why a topology's module list cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("unknown module {0:?}; registered modules: {1}")]
    Unknown(String, String),
    #[error("module {0:?} is listed twice")]
    Duplicate(String),
    #[error("module name {0:?} is reserved")]
    Reserved(String),
    #[error("module name {0:?} is registered twice (is it a built-in's name?)")]
    Registered(String),
}

/// The modules a process knows by name. Topology files pick from it.
#[derive(Clone, Default)]
pub struct Registry {
    modules: BTreeMap<&'static str, Arc<dyn DynModule>>,
    /// Registrations refused (a reserved or taken name), reported by [`Registry::select`]
    /// so that `register` stays chainable.
    refused: Vec<RegistryError>,
}

impl Registry {
    /// The built-in state types. A new state type adds one line here.
    pub fn with_builtins() -> Registry {
        Registry::default().register(Recording).register(Tags)
    }

    /// Adds a module. A reserved name, or one already registered (a
    /// built-in's, say), is refused: the job then refuses to start, since a
    /// module silently replacing another would change what its state means.
    pub fn register<M: Module>(mut self, module: M) -> Registry {
        let name = Module::name(&module);
        if RESERVED_MODULE_NAMES.contains(&name) {
            self.refused.push(RegistryError::Reserved(name.to_owned()));
        } else if self.modules.contains_key(name) {
            self.refused.push(RegistryError::Registered(name.to_owned()));
        } else {
            self.modules.insert(name, Arc::new(module));
        }
        self
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.modules.keys().copied().collect()
    }

    /// The modules named by a topology, in its order.
    pub fn select(&self, names: &[String]) -> Result<Vec<Arc<dyn DynModule>>, RegistryError> {
        if let Some(refused) = self.refused.first() {
            return Err(refused.clone());
        }
        let mut picked: Vec<Arc<dyn DynModule>> = Vec::with_capacity(names.len());
        for name in names {
            if RESERVED_MODULE_NAMES.contains(&name.as_str()) {
                return Err(RegistryError::Reserved(name.clone()));
            }
            if picked.iter().any(|m| m.name() == name) {
                return Err(RegistryError::Duplicate(name.clone()));
            }
            let module = self
                .modules
                .get(name.as_str())
                .ok_or_else(|| RegistryError::Unknown(name.clone(), self.names().join(", ")))?;
            picked.push(Arc::clone(module));
        }
        Ok(picked)
    }
}
