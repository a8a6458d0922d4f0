//! The protobuf codec of our services: prost, with small starting buffers.
//!
//! tonic starts every call's encode and decode buffers at 8 KiB. Our
//! messages are a few hundred bytes at most (4 KiB of metadata in the
//! worst case, and the buffers grow when needed), but a KeepAlive stream
//! keeps its buffers for as long as it lives: with 10 000 open streams the
//! default buffers alone were over 150 MiB of the server's memory.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Starting buffer size; buffers still grow to fit larger messages.
const BUFFER_BYTES: usize = 512;
/// tonic's default: how much may be encoded before yielding to the runtime.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// `ProstCodec` with 512-byte starting buffers (set in build.rs as the
/// generated code's codec).
#[derive(Debug, Clone, Copy)]
pub struct CompactCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for CompactCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for CompactCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD))
    }
}
