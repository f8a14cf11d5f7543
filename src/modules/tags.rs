//! The `tags` module: free-form key/value labels on a room.

use std::collections::BTreeMap;

use smol_str::SmolStr;

use super::{Limits, Module, RejectKind, Rejection};
use crate::proto::tecate::room_event::Kind;
use crate::proto::tecate::RoomEvent;

pub struct Tags;

impl Module for Tags {
    /// Sorted, so the JSON form of equal states is equal text. Short text
    /// is held inline and long text shared, so the copy each pure fold makes
    /// neither allocates per tag nor touches a shared count for short tags.
    type State = BTreeMap<SmolStr, SmolStr>;

    fn name(&self) -> &'static str {
        "tags"
    }

    fn reacts_to(&self, event: &RoomEvent) -> bool {
        matches!(event.kind, Some(Kind::TagSet(_) | Kind::TagRemoved(_)))
    }

    fn fold(&self, state: &Self::State, event: &RoomEvent, limits: &Limits) -> Result<Option<Self::State>, Rejection> {
        match &event.kind {
            Some(Kind::TagSet(set)) => {
                check_key(&set.key, limits)?;
                if set.value.len() > limits.max_tag_value_bytes {
                    return Err(Rejection::new(
                        RejectKind::OverLimit,
                        format!(
                            "tag value is {} bytes, over the {}-byte limit",
                            set.value.len(),
                            limits.max_tag_value_bytes
                        ),
                    ));
                }
                match state.get(set.key.as_str()) {
                    Some(current) if **current == *set.value => Ok(None),
                    existing => {
                        if existing.is_none() && state.len() >= limits.max_tags_per_room {
                            return Err(Rejection::new(
                                RejectKind::OverLimit,
                                format!("room already holds {} tags, the limit", limits.max_tags_per_room),
                            ));
                        }
                        let mut next = state.clone();
                        next.insert(SmolStr::new(&set.key), SmolStr::new(&set.value));
                        Ok(Some(next))
                    }
                }
            }
            Some(Kind::TagRemoved(removed)) => {
                check_key(&removed.key, limits)?;
                if !state.contains_key(removed.key.as_str()) {
                    return Ok(None);
                }
                let mut next = state.clone();
                next.remove(removed.key.as_str());
                Ok(Some(next))
            }
            _ => Ok(None),
        }
    }
}

fn check_key(key: &str, limits: &Limits) -> Result<(), Rejection> {
    if key.is_empty() {
        return Err(Rejection::new(RejectKind::InvalidEvent, "tag key is empty"));
    }
    if key.len() > limits.max_tag_key_bytes {
        return Err(Rejection::new(
            RejectKind::OverLimit,
            format!("tag key is {} bytes, over the {}-byte limit", key.len(), limits.max_tag_key_bytes),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modules::room::test_events::*;

    type State = BTreeMap<SmolStr, SmolStr>;

    fn fold(state: &State, event: &RoomEvent) -> Result<Option<State>, Rejection> {
        Tags.fold(state, event, &Limits::default())
    }

    fn tags(pairs: &[(&str, &str)]) -> State {
        pairs.iter().map(|(k, v)| (SmolStr::new(k), SmolStr::new(v))).collect()
    }

    #[test]
    fn set_adds_or_replaces_and_equal_value_is_a_no_op() {
        let one = fold(&State::new(), &tag_set("topic", "physics")).unwrap().unwrap();
        assert_eq!(one, tags(&[("topic", "physics")]));
        assert_eq!(fold(&one, &tag_set("topic", "physics")).unwrap(), None);
        let two = fold(&one, &tag_set("topic", "chemistry")).unwrap().unwrap();
        assert_eq!(serde_json::to_string(&two).unwrap(), r#"{"topic":"chemistry"}"#);
    }

    #[test]
    fn remove_deletes_and_absent_key_is_a_no_op() {
        let one = tags(&[("a", "1"), ("b", "2")]);
        assert_eq!(fold(&one, &tag_remove("a")).unwrap(), Some(tags(&[("b", "2")])));
        assert_eq!(fold(&one, &tag_remove("zzz")).unwrap(), None);
    }

    #[test]
    fn limits_reject_long_keys_long_values_and_too_many_tags() {
        let limits = Limits { max_tags_per_room: 2, max_tag_key_bytes: 3, max_tag_value_bytes: 4, ..Limits::default() };
        let full = tags(&[("a", "1"), ("b", "2")]);
        let over = |s: &State, e: &RoomEvent| Tags.fold(s, e, &limits).unwrap_err().kind;
        assert_eq!(over(&State::new(), &tag_set("long", "1")), RejectKind::OverLimit);
        assert_eq!(over(&State::new(), &tag_set("k", "12345")), RejectKind::OverLimit);
        assert_eq!(over(&full, &tag_set("c", "3")), RejectKind::OverLimit);
        // Replacing an existing key at the limit is fine.
        assert_eq!(Tags.fold(&full, &tag_set("a", "9"), &limits).unwrap(), Some(tags(&[("a", "9"), ("b", "2")])));
        // Exactly at the byte limits is fine.
        assert!(Tags.fold(&State::new(), &tag_set("abc", "1234"), &limits).unwrap().is_some());
    }

    #[test]
    fn empty_key_is_an_invalid_event() {
        assert_eq!(fold(&State::new(), &tag_set("", "v")).unwrap_err().kind, RejectKind::InvalidEvent);
    }
}
