//! Length-prefixed framing shared by the sync and ephemeral streams.
//!
//! A frame is a `u32` big-endian length followed by that many bytes. The length is
//! checked against the protocol's cap before a single byte of payload is allocated, so a
//! peer that announces 4 GiB costs us four bytes of reading and a closed stream.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::Error;

/// Size of the length prefix in bytes.
pub(crate) const HEADER_LEN: usize = 4;

/// Reads a frame header and returns the announced payload length.
///
/// `Ok(None)` means the stream ended cleanly on a frame boundary. A header cut short, or
/// a length above `max`, is an error and the caller must close the stream: there is no
/// way to find the next frame boundary after either.
pub(crate) async fn read_header<R>(reader: &mut R, max: usize) -> Result<Option<usize>, Error>
where
    R: AsyncRead + Unpin,
{
    let mut header = [0u8; HEADER_LEN];
    let got = read_full(reader, &mut header).await?;
    if got == 0 {
        return Ok(None);
    }
    if got < HEADER_LEN {
        return Err(Error::TruncatedFrame {
            expected: HEADER_LEN,
            received: got,
        });
    }
    // u32 always fits in usize on the 32- and 64-bit targets libp2p supports.
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(Error::FrameTooLarge { len, max });
    }
    Ok(Some(len))
}

/// Reads exactly `len` payload bytes; `len` must already be checked by [`read_header`].
pub(crate) async fn read_body<R>(reader: &mut R, len: usize) -> Result<Vec<u8>, Error>
where
    R: AsyncRead + Unpin,
{
    let mut body = vec![0u8; len];
    let got = read_full(reader, &mut body).await?;
    if got < len {
        return Err(Error::TruncatedFrame {
            expected: len,
            received: got,
        });
    }
    Ok(body)
}

/// Writes one frame without flushing, so a burst of queued frames leaves in few packets.
pub(crate) async fn write_frame<W>(writer: &mut W, payload: &[u8]) -> Result<(), Error>
where
    W: AsyncWrite + Unpin,
{
    let len = u32::try_from(payload.len()).map_err(|_| Error::FrameTooLarge {
        len: payload.len(),
        max: u32::MAX as usize,
    })?;
    writer.write_all(&len.to_be_bytes()).await?;
    writer.write_all(payload).await?;
    Ok(())
}

/// Fills `buf` until it is full or the stream ends, returning how much arrived.
///
/// Unlike `read_exact` this reports the partial count, which tells a clean end of
/// stream (0 bytes) apart from a truncated frame.
async fn read_full<R>(reader: &mut R, buf: &mut [u8]) -> Result<usize, Error>
where
    R: AsyncRead + Unpin,
{
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]).await {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use futures::executor::block_on;
    use futures::io::Cursor;

    use super::*;

    async fn read_one(bytes: &[u8], max: usize) -> Result<Option<Vec<u8>>, Error> {
        let mut cursor = Cursor::new(bytes.to_vec());
        match read_header(&mut cursor, max).await? {
            None => Ok(None),
            Some(len) => read_body(&mut cursor, len).await.map(Some),
        }
    }

    #[test]
    fn frames_round_trip_back_to_back() {
        block_on(async {
            let mut buf = Cursor::new(Vec::new());
            write_frame(&mut buf, b"hello").await.unwrap();
            write_frame(&mut buf, b"").await.unwrap();
            write_frame(&mut buf, &[7u8; 1000]).await.unwrap();
            let bytes = buf.into_inner();
            assert_eq!(
                &bytes[..4],
                &[0, 0, 0, 5],
                "length prefix is u32 big-endian"
            );

            let mut cursor = Cursor::new(bytes);
            let mut frames = Vec::new();
            while let Some(len) = read_header(&mut cursor, 4096).await.unwrap() {
                frames.push(read_body(&mut cursor, len).await.unwrap());
            }
            assert_eq!(frames, vec![b"hello".to_vec(), Vec::new(), vec![7u8; 1000]]);
        });
    }

    #[test]
    fn clean_end_of_stream_is_not_an_error() {
        assert!(block_on(read_one(&[], 16)).unwrap().is_none());
    }

    #[test]
    fn oversized_length_is_refused_before_allocation() {
        // Announces 4 GiB - 1; if this allocated, the test process would abort.
        let err = block_on(read_one(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3], 4 << 20)).unwrap_err();
        assert!(
            matches!(err, Error::FrameTooLarge { len: 0xffff_ffff, max } if max == 4 << 20),
            "{err}"
        );
    }

    #[test]
    fn length_exactly_at_the_cap_is_accepted() {
        let mut bytes = 8u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[1; 8]);
        assert_eq!(block_on(read_one(&bytes, 8)).unwrap().unwrap(), vec![1; 8]);
        let err = block_on(read_one(&bytes, 7)).unwrap_err();
        assert!(matches!(err, Error::FrameTooLarge { len: 8, max: 7 }));
    }

    #[test]
    fn truncated_header_and_body_are_reported_with_counts() {
        let err = block_on(read_one(&[0, 0], 16)).unwrap_err();
        assert!(matches!(
            err,
            Error::TruncatedFrame {
                expected: 4,
                received: 2
            }
        ));
        let err = block_on(read_one(&[0, 0, 0, 10, 1, 2, 3], 16)).unwrap_err();
        assert!(matches!(
            err,
            Error::TruncatedFrame {
                expected: 10,
                received: 3
            }
        ));
    }

    #[test]
    fn random_bytes_never_panic_and_never_exceed_the_cap() {
        // A cheap deterministic generator keeps the test reproducible without a rand dep.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let (mut frames, mut errors) = (0, 0);
        for _ in 0..500 {
            let mut bytes = Vec::new();
            let n = (state % 64) as usize;
            for _ in 0..n {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                bytes.push(state as u8);
            }
            state = state.wrapping_add(1);
            let mut cursor = Cursor::new(bytes);
            // Whatever the bytes, reading ends in frames within the cap, then a clean end
            // or an error.
            loop {
                match block_on(read_header(&mut cursor, 32)) {
                    Ok(Some(len)) => {
                        assert!(len <= 32);
                        match block_on(read_body(&mut cursor, len)) {
                            Ok(body) => {
                                assert_eq!(body.len(), len);
                                frames += 1;
                            }
                            Err(_) => {
                                errors += 1;
                                break;
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(_) => {
                        errors += 1;
                        break;
                    }
                }
            }
        }
        assert!(
            errors > 400,
            "random input is almost always refused ({errors} errors)"
        );
        assert!(frames < 100, "{frames} random frames parsed");
    }
}
