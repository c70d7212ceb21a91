//! Wire codec: serde + bincode 2.0.1, and length-checked frames.
//!
//! This is the only module that names `bincode` (DESIGN.md §3: bincode 2.0.1 is pinned but marked
//! unmaintained by RUSTSEC-2025-0141, so swapping it for e.g. postcard must be a one-module change).
//!
//! - [`encode`] / [`decode`]: any serde type to and from bytes, with `bincode::config::standard()`
//!   (little-endian, varint) and a decode byte limit of [`MAX_FRAME_LEN_CEILING`], so a hostile
//!   length prefix inside a payload cannot make the decoder allocate without bound. [`decode`]
//!   rejects trailing bytes.
//! - [`write_frame`] / [`read_frame`]: a frame is a `u32` little-endian payload length followed by
//!   the payload. The reader checks the length against its limit *before* allocating or reading
//!   the payload, so an oversized header costs four bytes of reading, nothing more.
//! - [`write_message`] / [`read_message`]: the two combined, as used on control streams.
//!
//! Errors are typed ([`CodecError`]) and say what was wrong: an oversized frame names its length
//! and the limit, an undecodable payload names the Rust type it should have been.

use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Default largest frame payload, in bytes (16 MiB): control messages, results and small
/// all-reduce buffers. Bulk data (weights) does not travel over QUIC frames (DESIGN.md §3).
pub const DEFAULT_MAX_FRAME_LEN: usize = 16 << 20;

/// Hard ceiling on any frame payload and on what [`decode`] accepts (1 GiB), whatever limit a
/// caller asks for.
pub const MAX_FRAME_LEN_CEILING: usize = 1 << 30;

/// Length of the frame header: a `u32` little-endian payload length.
pub const FRAME_HEADER_LEN: usize = 4;

/// The bincode configuration of the wire format: standard (varint, little-endian) with a decode
/// byte limit.
fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME_LEN_CEILING>()
}

/// What went wrong while encoding, decoding, writing or reading a frame.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// A frame's length is above the limit. Raised before any payload byte is read or allocated
    /// (reading) or written (writing).
    #[error(
        "frame of {len} bytes exceeds the limit of {limit} bytes (raise max_frame_len on both \
         sides, or send large data on a bulk stream)"
    )]
    Oversized {
        /// The payload length the header announced (or the payload had, when writing).
        len: u64,
        /// The limit in force.
        limit: usize,
    },
    /// A value could not be encoded.
    #[error("could not encode a `{type_name}`: {reason}")]
    Encode {
        /// The Rust type being encoded.
        type_name: &'static str,
        /// bincode's explanation.
        reason: String,
    },
    /// A payload is not a valid encoding of the expected type (garbage, a different message type,
    /// a different program version, or trailing bytes).
    #[error("could not decode a `{type_name}` from a {len}-byte payload: {reason}")]
    Decode {
        /// The Rust type the payload should have been.
        type_name: &'static str,
        /// Length of the payload, in bytes.
        len: usize,
        /// bincode's explanation, or "N trailing bytes".
        reason: String,
    },
    /// The stream ended in the middle of a frame (inside the header or the payload).
    #[error("stream ended inside a frame: got {got} of {expected} bytes of the {part}")]
    Truncated {
        /// Which part was cut: "header" or "payload".
        part: &'static str,
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        expected: usize,
    },
    /// The underlying stream failed.
    #[error("i/o error on the frame stream: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes `value` with the wire format (bincode 2 standard configuration).
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| CodecError::Encode {
        type_name: std::any::type_name::<T>(),
        reason: e.to_string(),
    })
}

/// Decodes a `T` from exactly `bytes` (trailing bytes are an error). Never panics on bad input.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let err = |reason: String| CodecError::Decode {
        type_name: std::any::type_name::<T>(),
        len: bytes.len(),
        reason,
    };
    if bytes.len() > MAX_FRAME_LEN_CEILING {
        return Err(err(format!("payload is above the {MAX_FRAME_LEN_CEILING}-byte decode limit")));
    }
    let (value, used) = bincode::serde::decode_from_slice::<T, _>(bytes, config())
        .map_err(|e| err(e.to_string()))?;
    if used != bytes.len() {
        return Err(err(format!("{} trailing bytes after the value", bytes.len() - used)));
    }
    Ok(value)
}

/// The limit actually in force for a caller's `max_len`.
fn effective_limit(max_len: usize) -> usize {
    max_len.min(MAX_FRAME_LEN_CEILING)
}

/// Writes one frame (`u32` LE length, then `payload`) and flushes it.
///
/// Fails with [`CodecError::Oversized`] without writing anything when `payload` is longer than
/// `max_len` (or [`MAX_FRAME_LEN_CEILING`]).
pub async fn write_frame<W: AsyncWrite + Unpin + ?Sized>(
    writer: &mut W,
    payload: &[u8],
    max_len: usize,
) -> Result<(), CodecError> {
    let limit = effective_limit(max_len);
    if payload.len() > limit {
        return Err(CodecError::Oversized { len: payload.len() as u64, limit });
    }
    // `limit` <= 1 GiB, so the length fits a u32.
    let header = (payload.len() as u32).to_le_bytes();
    writer.write_all(&header).await?;
    writer.write_all(payload).await?;
    writer.flush().await?;
    Ok(())
}

/// Reads into `buf` until it is full or the stream ends; returns how many bytes were read.
async fn read_full<R: AsyncRead + Unpin + ?Sized>(
    reader: &mut R,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let n = reader.read(&mut buf[got..]).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}

/// Reads one frame and returns its payload, or `None` when the stream ended cleanly before a new
/// frame began.
///
/// The announced length is checked against `max_len` (and [`MAX_FRAME_LEN_CEILING`]) before the
/// payload is allocated or read: an oversized header yields [`CodecError::Oversized`] after
/// reading only the four header bytes. A stream that ends inside a frame yields
/// [`CodecError::Truncated`].
pub async fn read_frame<R: AsyncRead + Unpin + ?Sized>(
    reader: &mut R,
    max_len: usize,
) -> Result<Option<Vec<u8>>, CodecError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    let got = read_full(reader, &mut header).await?;
    if got == 0 {
        return Ok(None);
    }
    if got < FRAME_HEADER_LEN {
        return Err(CodecError::Truncated { part: "header", got, expected: FRAME_HEADER_LEN });
    }
    let len = u32::from_le_bytes(header);
    let limit = effective_limit(max_len);
    if len as u64 > limit as u64 {
        return Err(CodecError::Oversized { len: len as u64, limit });
    }
    let len = len as usize;
    let mut payload = vec![0u8; len];
    let got = read_full(reader, &mut payload).await?;
    if got < len {
        return Err(CodecError::Truncated { part: "payload", got, expected: len });
    }
    Ok(Some(payload))
}

/// Encodes `value` and writes it as one frame (see [`write_frame`]).
pub async fn write_message<W, T>(
    writer: &mut W,
    value: &T,
    max_len: usize,
) -> Result<(), CodecError>
where
    W: AsyncWrite + Unpin + ?Sized,
    T: Serialize + ?Sized,
{
    let payload = encode(value)?;
    write_frame(writer, &payload, max_len).await
}

/// Reads one frame and decodes it as a `T`; `None` when the stream ended cleanly between frames
/// (see [`read_frame`] and [`decode`]).
pub async fn read_message<R, T>(reader: &mut R, max_len: usize) -> Result<Option<T>, CodecError>
where
    R: AsyncRead + Unpin + ?Sized,
    T: DeserializeOwned,
{
    match read_frame(reader, max_len).await? {
        Some(payload) => decode(&payload).map(Some),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum Msg {
        Hello { rank: u32, host: String },
        Grad(Vec<f32>),
        Done,
    }

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn encode_decode_round_trip() {
        for msg in [
            Msg::Hello { rank: 7, host: "node-03".into() },
            Msg::Grad(vec![1.5, -2.0, f32::MAX]),
            Msg::Done,
        ] {
            let bytes = encode(&msg).unwrap();
            assert_eq!(decode::<Msg>(&bytes).unwrap(), msg);
        }
    }

    #[test]
    fn decode_rejects_garbage_truncation_and_trailing_bytes() {
        let bytes = encode(&Msg::Hello { rank: 1, host: "abc".into() }).unwrap();
        // Truncated payload.
        let err = decode::<Msg>(&bytes[..bytes.len() - 1]).unwrap_err();
        assert!(matches!(err, CodecError::Decode { .. }), "{err}");
        assert!(err.to_string().contains("Msg"), "error names the type: {err}");
        // Trailing bytes.
        let mut longer = bytes.clone();
        longer.push(0);
        let err = decode::<Msg>(&longer).unwrap_err();
        assert!(err.to_string().contains("1 trailing bytes"), "{err}");
        // Unknown enum variant.
        assert!(decode::<Msg>(&[200, 1, 2, 3]).is_err());
        // A Vec whose length prefix claims u64::MAX elements: an error, not an allocation.
        let mut huge = vec![1u8]; // variant Grad
        huge.push(253); // bincode varint marker: u64 follows
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        let err = decode::<Msg>(&huge).unwrap_err();
        assert!(matches!(err, CodecError::Decode { .. }), "{err}");
        // Empty input.
        assert!(decode::<Msg>(&[]).is_err());
    }

    #[tokio::test]
    async fn frames_round_trip_and_clean_eof() {
        let mut wire = Vec::new();
        let msgs = [Msg::Done, Msg::Grad(vec![0.25; 1000])];
        for m in &msgs {
            write_message(&mut wire, m, 1 << 20).await.unwrap();
        }
        let mut reader = wire.as_slice();
        for m in &msgs {
            let got: Msg = read_message(&mut reader, 1 << 20).await.unwrap().unwrap();
            assert_eq!(&got, m);
        }
        assert!(read_message::<_, Msg>(&mut reader, 1 << 20).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn oversized_header_is_refused_before_reading_the_payload() {
        let wire = frame(&[7u8; 2000]);
        let mut reader = wire.as_slice();
        let err = read_frame(&mut reader, 1000).await.unwrap_err();
        match err {
            CodecError::Oversized { len, limit } => assert_eq!((len, limit), (2000, 1000)),
            other => panic!("expected Oversized, got {other}"),
        }
        // Only the four header bytes were consumed.
        assert_eq!(reader.len(), 2000);
        // A header announcing ~4 GiB with no payload behind it: refused the same way.
        let wire = u32::MAX.to_le_bytes();
        let err = read_frame(&mut wire.as_slice(), DEFAULT_MAX_FRAME_LEN).await.unwrap_err();
        assert!(err.to_string().contains(&u32::MAX.to_string()), "{err}");
        assert!(err.to_string().contains("16777216"), "{err}");
    }

    #[tokio::test]
    async fn oversized_write_is_refused_without_writing() {
        let mut wire = Vec::new();
        let err = write_frame(&mut wire, &[0u8; 11], 10).await.unwrap_err();
        assert!(matches!(err, CodecError::Oversized { len: 11, limit: 10 }));
        assert!(wire.is_empty());
    }

    #[tokio::test]
    async fn truncated_and_garbage_frames_are_errors() {
        // Header cut short.
        let err = read_frame(&mut [5u8, 0].as_slice(), 100).await.unwrap_err();
        assert!(matches!(err, CodecError::Truncated { part: "header", got: 2, expected: 4 }));
        // Payload cut short.
        let mut wire = frame(&[1, 2, 3, 4, 5]);
        wire.truncate(7);
        let err = read_frame(&mut wire.as_slice(), 100).await.unwrap_err();
        assert!(matches!(err, CodecError::Truncated { part: "payload", got: 3, expected: 5 }));
        // A well-formed frame of garbage.
        let wire = frame(&[0xff, 0xfe, 0xfd, 0xfc, 0xfb]);
        let err = read_message::<_, Msg>(&mut wire.as_slice(), 100).await.unwrap_err();
        assert!(matches!(err, CodecError::Decode { len: 5, .. }), "{err}");
    }
}
