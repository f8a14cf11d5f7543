//! What an input record carries: a Tecate event (with, in an `omni.lease`
//! header, an omni [`Lease`] on it), or an omni [`KeepAlive`] marked by its
//! `omni.type` header. Tecate values stay as they are; omni's additions
//! travel beside them, so Tecate producers and readers need no change.

use prost::Message;

use super::timers::check_lease;
use super::{RejectKind, Rejection};
use crate::proto::omni::{KeepAlive, Lease};
use crate::proto::tecate::RoomEvent;

/// The header naming an omni message type on the input topic; absent on Tecate events.
pub const TYPE_HEADER: &str = "omni.type";

/// The [`TYPE_HEADER`] value of a keep-alive record.
pub const KEEPALIVE_TYPE: &str = "omni.v1.KeepAlive";

/// The header carrying an encoded [`Lease`] on a Tecate event's record.
pub const LEASE_HEADER: &str = "omni.lease";

/// The omni headers of an input record, as raw bytes.
#[derive(Debug, Default, Clone, Copy)]
pub struct InputHeaders<'a> {
    pub kind: Option<&'a [u8]>,
    pub lease: Option<&'a [u8]>,
}

/// A decoded input record's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Event { event: RoomEvent, lease: Option<Lease> },
    KeepAlive(KeepAlive),
}

impl Input {
    /// Decodes a record's value by its headers.
    pub fn decode(value: &[u8], headers: InputHeaders<'_>) -> Result<Input, Rejection> {
        match headers.kind {
            None => {}
            Some(kind) if kind == KEEPALIVE_TYPE.as_bytes() => {
                let keepalive = KeepAlive::decode(value)
                    .map_err(|e| Rejection::new(RejectKind::Undecodable, format!("not an omni KeepAlive: {e}")))?;
                return Ok(Input::KeepAlive(keepalive));
            }
            Some(kind) => {
                return Err(Rejection::new(
                    RejectKind::Undecodable,
                    format!("unknown {TYPE_HEADER} {:?}", String::from_utf8_lossy(kind)),
                ));
            }
        }
        let event = RoomEvent::decode(value)
            .map_err(|e| Rejection::new(RejectKind::Undecodable, format!("not a Tecate RoomEvent: {e}")))?;
        if event.kind.is_none() {
            return Err(Rejection::new(RejectKind::Undecodable, "Tecate RoomEvent has no event kind"));
        }
        let lease = match headers.lease {
            None => None,
            Some(bytes) => {
                let lease = Lease::decode(bytes).map_err(|e| {
                    Rejection::new(RejectKind::Undecodable, format!("{LEASE_HEADER} is not a Lease: {e}"))
                })?;
                check_lease(&lease)?;
                Some(lease)
            }
        };
        Ok(Input::Event { event, lease })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modules::room::test_events::start;

    #[test]
    fn headers_tell_keepalives_and_leases_from_plain_tecate_events() {
        let event = start("r1", "u1");
        let value = event.encode_to_vec();
        let plain = Input::decode(&value, InputHeaders::default()).unwrap();
        assert_eq!(plain, Input::Event { event: event.clone(), lease: None });
        let lease = Lease { lease_id: "l1".into(), ttl_ms: 3000 };
        let bytes = lease.encode_to_vec();
        let leased = Input::decode(&value, InputHeaders { kind: None, lease: Some(&bytes) }).unwrap();
        assert_eq!(leased, Input::Event { event, lease: Some(lease) });
        let keepalive = KeepAlive { lease_ids: vec!["l1".into()] };
        let headers = InputHeaders { kind: Some(KEEPALIVE_TYPE.as_bytes()), lease: None };
        assert_eq!(Input::decode(&keepalive.encode_to_vec(), headers).unwrap(), Input::KeepAlive(keepalive));
        let unknown = InputHeaders { kind: Some(b"omni.v9.Other"), lease: None };
        assert_eq!(Input::decode(&value, unknown).unwrap_err().kind, RejectKind::Undecodable);
        let bad_lease = Lease { lease_id: String::new(), ttl_ms: 3000 }.encode_to_vec();
        let headers = InputHeaders { kind: None, lease: Some(&bad_lease) };
        assert_eq!(Input::decode(&value, headers).unwrap_err().kind, RejectKind::InvalidEvent);
    }
}
