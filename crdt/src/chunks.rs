//! Splitting a push payload into Automerge change chunks.
//!
//! A push carries the output of `save_incremental`: encoded changes back to
//! back. Automerge can load that blob as is, but the engine needs each change's
//! dependencies and actor *before* applying it (to fall back to a sync session
//! when dependencies are missing, and to let the node refuse writes from
//! unauthorised devices), so it walks the chunk headers itself.
//!
//! Chunk header: 4 magic bytes, 4 checksum bytes, 1 type byte, a ULEB128
//! length, then that many bytes of body.

use automerge::Change;

/// Magic bytes that open every Automerge chunk.
const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];

/// Chunk type of an uncompressed change. Compressed changes (type 2) are
/// refused in pushes: inflating them is unbounded work chosen by the sender,
/// and this crate never produces them (`save_incremental` writes raw changes).
const CHUNK_CHANGE: u8 = 1;

/// Splits `bytes` into parsed changes, refusing more than `max_changes`.
pub(crate) fn parse_changes(bytes: &[u8], max_changes: usize) -> Result<Vec<Change>, String> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        if out.len() >= max_changes {
            return Err(format!("more than {max_changes} changes in one push"));
        }
        let len = chunk_len(rest)?;
        let (chunk, tail) = rest.split_at(len);
        let change = Change::try_from(chunk).map_err(|e| format!("bad change: {e}"))?;
        out.push(change);
        rest = tail;
    }
    Ok(out)
}

/// Total length (header and body) of the chunk at the start of `bytes`.
fn chunk_len(bytes: &[u8]) -> Result<usize, String> {
    let header = bytes.get(..9).ok_or("truncated chunk header")?;
    if header[..4] != MAGIC {
        return Err("not an automerge chunk".into());
    }
    if header[8] != CHUNK_CHANGE {
        return Err(format!(
            "chunk type {} is not an uncompressed change",
            header[8]
        ));
    }
    let (body_len, leb_len) = read_uleb(&bytes[9..])?;
    let total = 9usize
        .checked_add(leb_len)
        .and_then(|n| n.checked_add(usize::try_from(body_len).ok()?))
        .ok_or("chunk length overflows")?;
    if total > bytes.len() {
        return Err(format!(
            "chunk declares {total} bytes but only {} remain",
            bytes.len()
        ));
    }
    Ok(total)
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

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_changes(&bytes, 16);
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
