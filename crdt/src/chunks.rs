//! Splitting peer payloads into Automerge chunks, before Automerge sees them.
//!
//! A push carries the output of `save_incremental`: encoded changes back to
//! back. Automerge can load that blob as is, but the engine needs each change's
//! dependencies and actor *before* applying it (to fall back to a sync session
//! when dependencies are missing, and to let the node refuse writes from
//! unauthorised devices), so it walks the chunk headers itself.
//!
//! A sync message's change list holds the same kind of blobs, and also whole
//! documents (`save()`, sent when a peer is far behind). Walking them here is
//! also where compressed input is refused: Automerge inflates a compressed
//! change chunk (type 2) and a document's deflated columns into a vector with
//! no output limit, so a 64 KiB frame can ask for gigabytes, an allocation
//! failure that aborts the process where no `catch_unwind` can stop it.
//! Nothing in this module inflates without a cap.
//!
//! Chunk header: 4 magic bytes, 4 checksum bytes, 1 type byte, a ULEB128
//! length, then that many bytes of body.

use std::io::Read;

use automerge::Change;

/// Magic bytes that open every Automerge chunk.
const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];

/// Chunk type of a whole document (`save()`). Its columns may be deflated:
/// Automerge's own `save()` deflates every column over 256 bytes, so a peer's
/// catch-up legitimately carries them, and they are inflated here with a cap
/// to learn their size before Automerge inflates them again without one.
const CHUNK_DOCUMENT: u8 = 0;
/// Chunk type of an uncompressed change. Automerge refuses deflated columns
/// inside one (`CompressedChangeCols`), so parsing it inflates nothing.
const CHUNK_CHANGE: u8 = 1;
/// Chunk type of a compressed change: one deflate stream Automerge inflates
/// in full before it checks anything. Neither `save_incremental` nor the sync
/// protocol (which sends `Change::raw_bytes`) writes one, so they are refused
/// outright.
const CHUNK_COMPRESSED: u8 = 2;
/// Chunk type of a bundle of changes, with deflated columns. Automerge never
/// sends one in a sync message or a push; refused like a compressed change.
const CHUNK_BUNDLE: u8 = 3;

/// Column specification bit that marks a deflated column in a document.
const COLUMN_DEFLATE: u64 = 0b1000;

/// Why a payload from a peer was refused. Nothing was inflated past the cap.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// A compressed change or a bundle (its chunk type).
    Compressed(u8),
    /// Over a cap once decoded.
    TooLarge {
        /// Which measure.
        what: &'static str,
        /// How much was counted before stopping (more than `cap`).
        len: usize,
        /// The cap.
        cap: usize,
    },
    /// Not well-formed chunks.
    Malformed(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Compressed(t) => write!(f, "compressed chunk (type {t})"),
            Self::TooLarge { what, len, cap } => write!(f, "{what} reached {len}, over {cap}"),
            Self::Malformed(reason) => f.write_str(reason),
        }
    }
}

/// Caps for one payload (one push, or every chunk of one sync message).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Most change chunks.
    pub(crate) max_changes: usize,
    /// Most bytes once decoded: change chunks as they are, documents with
    /// their deflated columns inflated.
    pub(crate) max_decoded: usize,
    /// Most ops in the change chunks (a few bytes of run-length encoding can
    /// declare millions).
    pub(crate) max_ops: usize,
    /// Whether whole documents may appear (sync messages), or only changes
    /// (pushes).
    pub(crate) documents: bool,
}

impl Limits {
    /// No caps: for bytes this engine wrote itself.
    pub(crate) const TRUSTED: Limits = Limits {
        max_changes: usize::MAX,
        max_decoded: usize::MAX,
        max_ops: usize::MAX,
        documents: false,
    };
}

/// The chunks of a peer payload, walked under [`Limits`].
#[derive(Debug)]
pub(crate) struct Scanner<'a> {
    limits: Limits,
    /// Parsed change chunks, in order.
    pub(crate) changes: Vec<Change>,
    /// Whole-document chunks, as received.
    pub(crate) documents: Vec<&'a [u8]>,
    /// Decoded bytes so far (see [`Limits::max_decoded`]).
    pub(crate) decoded: usize,
    /// Ops in the change chunks so far.
    pub(crate) ops: usize,
    /// Decoded bytes of the document chunks alone.
    pub(crate) document_bytes: usize,
}

impl<'a> Scanner<'a> {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            limits,
            changes: Vec::new(),
            documents: Vec::new(),
            decoded: 0,
            ops: 0,
            document_bytes: 0,
        }
    }

    /// Walks one blob of chunks back to back, refusing it at the first chunk
    /// that breaks a cap. Compressed data is refused on its header, before a
    /// byte of it is read.
    pub(crate) fn scan(&mut self, bytes: &'a [u8]) -> Result<(), Refusal> {
        let mut rest = bytes;
        while !rest.is_empty() {
            let (chunk_type, header_len, total) = chunk_header(rest).map_err(Refusal::Malformed)?;
            let (chunk, tail) = rest.split_at(total);
            match chunk_type {
                CHUNK_CHANGE => {
                    if self.changes.len() >= self.limits.max_changes {
                        return Err(Refusal::TooLarge {
                            what: "changes",
                            len: self.changes.len() + 1,
                            cap: self.limits.max_changes,
                        });
                    }
                    self.charge(chunk.len())?;
                    let change = Change::try_from(chunk)
                        .map_err(|e| Refusal::Malformed(format!("bad change: {e}")))?;
                    self.ops = self.ops.saturating_add(change.len());
                    if self.ops > self.limits.max_ops {
                        return Err(Refusal::TooLarge {
                            what: "ops",
                            len: self.ops,
                            cap: self.limits.max_ops,
                        });
                    }
                    self.changes.push(change);
                }
                CHUNK_DOCUMENT if self.limits.documents => {
                    let left = self.limits.max_decoded.saturating_sub(self.decoded);
                    let size =
                        document_decoded_len(&chunk[header_len..], left).map_err(|e| match e {
                            Refusal::TooLarge { len, .. } => Refusal::TooLarge {
                                what: "decoded bytes",
                                len: self.decoded.saturating_add(len),
                                cap: self.limits.max_decoded,
                            },
                            other => other,
                        })?;
                    self.charge(size)?;
                    self.document_bytes = self.document_bytes.saturating_add(size);
                    self.documents.push(chunk);
                }
                CHUNK_DOCUMENT => {
                    return Err(Refusal::Malformed(
                        "a whole document where only changes belong".into(),
                    ));
                }
                CHUNK_COMPRESSED | CHUNK_BUNDLE => return Err(Refusal::Compressed(chunk_type)),
                other => return Err(Refusal::Malformed(format!("unknown chunk type {other}"))),
            }
            rest = tail;
        }
        Ok(())
    }

    fn charge(&mut self, len: usize) -> Result<(), Refusal> {
        self.decoded = self.decoded.saturating_add(len);
        if self.decoded > self.limits.max_decoded {
            return Err(Refusal::TooLarge {
                what: "decoded bytes",
                len: self.decoded,
                cap: self.limits.max_decoded,
            });
        }
        Ok(())
    }
}

/// Splits `bytes` (uncompressed changes back to back, as in a push) into
/// parsed changes, refusing more than `max_changes`.
pub(crate) fn parse_changes(bytes: &[u8], max_changes: usize) -> Result<Vec<Change>, String> {
    let mut scanner = Scanner::new(Limits {
        max_changes,
        ..Limits::TRUSTED
    });
    scanner.scan(bytes).map_err(|e| match e {
        Refusal::TooLarge { .. } => format!("more than {max_changes} changes in one push"),
        other => other.to_string(),
    })?;
    Ok(scanner.changes)
}

/// The chunk at the start of `bytes`: its type, header length, and total
/// length (header and body).
fn chunk_header(bytes: &[u8]) -> Result<(u8, usize, usize), String> {
    let header = bytes.get(..9).ok_or("truncated chunk header")?;
    if header[..4] != MAGIC {
        return Err("not an automerge chunk".into());
    }
    let (body_len, leb_len) = read_uleb(&bytes[9..])?;
    let header_len = 9 + leb_len;
    let total = header_len
        .checked_add(usize::try_from(body_len).map_err(|_| "chunk length overflows")?)
        .ok_or("chunk length overflows")?;
    if total > bytes.len() {
        return Err(format!(
            "chunk declares {total} bytes but only {} remain",
            bytes.len()
        ));
    }
    Ok((header[8], header_len, total))
}

/// Total length (header and body) of the chunk at the start of `bytes`, which
/// must be an uncompressed change.
#[cfg(test)]
fn chunk_len(bytes: &[u8]) -> Result<usize, String> {
    let (chunk_type, _, total) = chunk_header(bytes)?;
    if chunk_type != CHUNK_CHANGE {
        return Err(format!(
            "chunk type {chunk_type} is not an uncompressed change"
        ));
    }
    Ok(total)
}

/// Size of a document chunk's body once its deflated columns are inflated,
/// counting at most `cap` bytes: past that it stops and refuses. The layout is
/// the one Automerge's `Document::parse` reads: actors, heads, the change and
/// op column specifications, their data, then head indexes.
pub(crate) fn document_decoded_len(body: &[u8], cap: usize) -> Result<usize, Refusal> {
    let malformed = |what: &str| Refusal::Malformed(format!("bad document chunk: {what}"));
    let mut r = Cursor(body);
    let actors = r.uleb().map_err(|e| malformed(&e))?;
    for _ in 0..actors {
        let len = r.uleb().map_err(|e| malformed(&e))?;
        r.take(len).map_err(|e| malformed(&e))?;
    }
    let heads = r.uleb().map_err(|e| malformed(&e))?;
    r.take(heads.saturating_mul(32))
        .map_err(|e| malformed(&e))?;
    let mut columns = Vec::new();
    for _ in 0..2 {
        let count = r.uleb().map_err(|e| malformed(&e))?;
        // Each entry takes at least two bytes; checking first keeps a huge
        // declared count from turning into a long loop.
        if count > r.0.len() as u64 / 2 {
            return Err(malformed("more columns than bytes"));
        }
        for _ in 0..count {
            let spec = r.uleb().map_err(|e| malformed(&e))?;
            let len = r.uleb().map_err(|e| malformed(&e))?;
            columns.push((spec, len));
        }
    }
    let mut decoded = body.len();
    for (spec, len) in columns {
        let data = r.take(len).map_err(|e| malformed(&e))?;
        if spec & COLUMN_DEFLATE != 0 {
            let left = cap.saturating_sub(decoded);
            let inflated = inflated_len(data, left)?;
            decoded = decoded.saturating_add(inflated);
        }
        if decoded > cap {
            return Err(Refusal::TooLarge {
                what: "decoded bytes",
                len: decoded,
                cap,
            });
        }
    }
    Ok(decoded)
}

/// Length of the deflate stream `data` once inflated, reading at most one
/// byte past `cap` into a sink: the output is counted, never stored.
fn inflated_len(data: &[u8], cap: usize) -> Result<usize, Refusal> {
    let limit = u64::try_from(cap).unwrap_or(u64::MAX).saturating_add(1);
    let mut inflater = flate2::bufread::DeflateDecoder::new(data).take(limit);
    let n = std::io::copy(&mut inflater, &mut std::io::sink())
        .map_err(|e| Refusal::Malformed(format!("bad deflated column: {e}")))?;
    let n = usize::try_from(n).unwrap_or(usize::MAX);
    if n > cap {
        return Err(Refusal::TooLarge {
            what: "decoded bytes",
            len: n,
            cap,
        });
    }
    Ok(n)
}

/// Reads the front of a byte slice.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn uleb(&mut self) -> Result<u64, String> {
        let (v, used) = read_uleb(self.0)?;
        self.0 = &self.0[used..];
        Ok(v)
    }

    fn take(&mut self, len: u64) -> Result<&'a [u8], String> {
        let len = usize::try_from(len)
            .ok()
            .filter(|l| *l <= self.0.len())
            .ok_or("truncated")?;
        let (head, tail) = self.0.split_at(len);
        self.0 = tail;
        Ok(head)
    }
}

/// Reads an unsigned LEB128 value of at most 10 bytes.
pub(crate) fn read_uleb(bytes: &[u8]) -> Result<(u64, usize), String> {
    let mut value: u64 = 0;
    for (i, b) in bytes.iter().take(10).enumerate() {
        let part = u64::from(b & 0x7f);
        let shift = 7 * i as u32;
        if shift == 63 && part > 1 {
            return Err("length overflows u64".into());
        }
        value |= part << shift;
        if b & 0x80 == 0 {
            return Ok((value, i + 1));
        }
    }
    Err("truncated or overlong length".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ROOT};
    use proptest::prelude::*;

    fn three_changes() -> Vec<u8> {
        let mut doc = AutoCommit::new();
        let mut all = Vec::new();
        for i in 0..3_i64 {
            doc.put(ROOT, "n", i).unwrap();
            doc.commit();
            all.extend(doc.save_incremental());
        }
        all
    }

    #[test]
    fn splits_concatenated_changes() {
        let changes = parse_changes(&three_changes(), 10).unwrap();
        assert_eq!(changes.len(), 3);
        assert_eq!(changes[1].deps(), &[changes[0].hash()]);
    }

    #[test]
    fn enforces_the_change_count_cap() {
        assert!(parse_changes(&three_changes(), 2).is_err());
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = three_changes();
        let first = chunk_len(&bytes).unwrap();
        for cut in 1..first {
            assert!(parse_changes(&bytes[..cut], 10).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn uleb_edges() {
        assert_eq!(read_uleb(&[0x00]), Ok((0, 1)));
        assert_eq!(read_uleb(&[0xe5, 0x8e, 0x26]), Ok((624_485, 3)));
        assert!(read_uleb(&[0xff; 11]).is_err());
        assert!(read_uleb(&[0x80]).is_err());
        let max = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert_eq!(read_uleb(&max), Ok((u64::MAX, 10)));
        let over = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert!(read_uleb(&over).is_err());
    }

    #[test]
    fn compressed_chunks_and_bundles_are_refused_on_their_header() {
        let plain = three_changes();
        for chunk_type in [CHUNK_COMPRESSED, CHUNK_BUNDLE] {
            // A body that is not even deflate: refused on the type byte alone.
            let mut bytes = plain.clone();
            bytes.extend_from_slice(&MAGIC);
            bytes.extend_from_slice(&[0, 0, 0, 0, chunk_type, 3, 0xff, 0xff, 0xff]);
            let mut scanner = Scanner::new(Limits::TRUSTED);
            assert_eq!(scanner.scan(&bytes), Err(Refusal::Compressed(chunk_type)));
        }
    }

    #[test]
    fn documents_are_measured_inflated_and_only_where_allowed() {
        let mut doc = AutoCommit::new();
        doc.put(ROOT, "note", "la ".repeat(2000)).unwrap();
        doc.commit();
        let saved = doc.save();
        let sync = Limits {
            documents: true,
            ..Limits::TRUSTED
        };
        let mut scanner = Scanner::new(sync);
        scanner.scan(&saved).unwrap();
        assert_eq!(scanner.documents.len(), 1);
        assert!(scanner.decoded > 6000, "{} decoded", scanner.decoded);
        let capped = Limits {
            max_decoded: 4096,
            ..sync
        };
        assert!(matches!(
            Scanner::new(capped).scan(&saved),
            Err(Refusal::TooLarge { cap: 4096, .. })
        ));
        assert!(matches!(
            Scanner::new(Limits::TRUSTED).scan(&saved),
            Err(Refusal::Malformed(_))
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_changes(&bytes, 16);
            let _ = Scanner::new(Limits { documents: true, max_decoded: 1 << 16, ..Limits::TRUSTED }).scan(&bytes);
        }

        #[test]
        fn mutated_changes_never_panic(at in 0usize..4096, byte in any::<u8>()) {
            let mut bytes = three_changes();
            let i = at % bytes.len();
            bytes[i] = byte;
            let _ = parse_changes(&bytes, 16);
        }
    }
}
