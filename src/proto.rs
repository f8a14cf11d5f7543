//! The generated wire types: Tecate room events (input) and omni's own
//! messages (paths, broadcast state changes, changelog room state).

mod generated {
    include!(concat!(env!("OUT_DIR"), "/protos.rs"));
}

/// Tecate room events, the processing job's input.
pub mod tecate {
    pub use super::generated::tecate::v1::*;
}

/// omni's own messages, and the Omni service (`omni serve`): its messages,
/// its tonic server (`omni_server`) and client (`omni_client`).
pub mod omni {
    pub use super::generated::omni::v1::*;
}

/// Every compiled proto file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/omni_descriptor.bin"));

pub use prost::Message;
pub use prost_types::Timestamp;

/// The Omni service's gRPC codec: prost's, with message buffers that start
/// at 1 KiB instead of tonic's 8 KiB. Every open stream keeps its encode
/// buffer at that size for as long as it is open, so ten thousand watches
/// held some 80 MiB of buffers mostly empty; a bigger message grows its
/// buffer as before.
#[derive(Debug)]
pub struct OmniCodec<T, U>(std::marker::PhantomData<(T, U)>);

/// A stream's first buffer: a few changes, or one room's snapshot.
const CODEC_BUFFER_BYTES: usize = 1024;

/// Encoded bytes a stream sends on at once (tonic's default).
const CODEC_YIELD_BYTES: usize = 32 * 1024;

impl<T, U> Default for OmniCodec<T, U> {
    fn default() -> Self {
        OmniCodec(std::marker::PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for OmniCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <tonic_prost::ProstCodec<T, U> as tonic::codec::Codec>::Encoder;
    type Decoder = <tonic_prost::ProstCodec<T, U> as tonic::codec::Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstCodec::<T, U>::raw_encoder(codec_buffers())
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstCodec::<T, U>::raw_decoder(codec_buffers())
    }
}

fn codec_buffers() -> tonic::codec::BufferSettings {
    tonic::codec::BufferSettings::new(CODEC_BUFFER_BYTES, CODEC_YIELD_BYTES)
}

/// Timestamp of a point in time given as milliseconds since the Unix epoch.
pub fn timestamp_from_millis(millis: i64) -> Timestamp {
    Timestamp { seconds: millis.div_euclid(1000), nanos: (millis.rem_euclid(1000) * 1_000_000) as i32 }
}

/// Milliseconds since the Unix epoch of a timestamp (0 when absent).
pub fn millis_of(ts: Option<&Timestamp>) -> i64 {
    ts.map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000).unwrap_or(0)
}

/// RFC 3339 text of a timestamp, in UTC with a `Z`, fractional seconds only when present.
pub fn rfc3339(ts: Option<&Timestamp>) -> String {
    let ts = ts.cloned().unwrap_or_default();
    chrono::DateTime::from_timestamp(ts.seconds, ts.nanos.clamp(0, 999_999_999) as u32)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// The current time as a protobuf timestamp.
pub fn now() -> Timestamp {
    timestamp_from_millis(chrono::Utc::now().timestamp_millis())
}
