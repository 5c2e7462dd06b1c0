//! Typed view of a `home` document, shared by the home's own devices only:
//! its device list, the homes it is paired with, and its keyring.
//!
//! Layout under the root key `home`:
//! - `name`: string;
//! - `devices.<PeerId>`: map { `name`, `certificate`: bytes, `revoked_at`: optional ms };
//! - `paired.<HomeId>`: map { `name`, `root_key`: bytes, `devices`: map { `<PeerId>`: certificate bytes },
//!   `accept_alerts`: optional bool (this home takes emergency alerts from that one; absent = no) };
//! - `keyring.<DocId>.<epoch>.<PeerId>`: the document key of that epoch wrapped for that device.
//!
//! Certificates and wrapped keys are opaque here; the node verifies and unwraps them.

use std::collections::BTreeMap;

use automerge::transaction::Transactable;
use automerge::{ROOT, ReadDoc, ScalarValue};

use super::touched::Touched;
use super::{am, ensure_map, join, keys, opt_str, opt_u64, req_bytes, req_map, req_str};
use crate::error::{Error, Result};
use crate::ids::{DocId, KeyEpoch};

/// Root key of the home map.
pub const HOME_KEY: &str = "home";
/// Key of the signed revocations under the home map.
const REVOCATIONS_KEY: &str = "revocations";

/// A member device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceRecord {
    /// Device name.
    pub name: String,
    /// Certificate signed by the home root key (opaque here).
    pub certificate: Vec<u8>,
    /// When it was revoked (ms since the Unix epoch), if it was.
    pub revoked_at: Option<u64>,
}

/// A paired home.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairedHome {
    /// Its name.
    pub name: String,
    /// Public half of its root key.
    pub root_key: Vec<u8>,
    /// Its devices' certificates by PeerId.
    pub devices: BTreeMap<String, Vec<u8>>,
    /// PeerId of the device of this home that made the pairing, so the pairings of a
    /// device revoked later can be found; `None` in records written before this was kept.
    pub by: Option<String>,
    /// Whether this home takes emergency alerts from that home (it opted in); `false`
    /// when never set.
    pub accept_alerts: bool,
}

/// The whole home document.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Home {
    /// Home name.
    pub name: String,
    /// Member devices by PeerId.
    pub devices: BTreeMap<String, DeviceRecord>,
    /// Paired homes by HomeId.
    pub paired: BTreeMap<String, PairedHome>,
    /// Wrapped document keys: (doc, epoch) -> device PeerId -> wrapped key.
    pub keyring: WrappedKeys,
}

/// Text form of an epoch used as a map key: fixed-width hex so keys sort in
/// epoch order.
pub fn epoch_key(epoch: &KeyEpoch) -> String {
    let mut out = format!("{:016x}-", epoch.counter);
    for b in epoch.device {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

fn parse_epoch_key(text: &str) -> Option<KeyEpoch> {
    let (counter, device) = text.split_once('-')?;
    if counter.len() != 16 || device.len() != 32 || !device.is_ascii() {
        return None;
    }
    let counter = u64::from_str_radix(counter, 16).ok()?;
    let mut out = [0u8; 16];
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = u8::from_str_radix(device.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(KeyEpoch {
        counter,
        device: out,
    })
}

/// Wrapped document keys: (doc, epoch) -> device PeerId -> wrapped key.
pub type WrappedKeys = BTreeMap<(DocId, KeyEpoch), BTreeMap<String, Vec<u8>>>;

/// Path of the keyring map, whose entries (one per document) [`Touched`] names.
pub const KEYRING_PATH: [&str; 2] = [HOME_KEY, "keyring"];

impl Home {
    /// Reads and validates the home view.
    pub fn read<D: ReadDoc>(doc: &D) -> Result<Self> {
        let (mut home, k) = read_without_keyring(doc)?;
        for doc_text in keys(doc, &k) {
            read_keyring_entry(doc, &k, &doc_text, &mut home.keyring)?;
        }
        Ok(home)
    }
}

/// Validates a home document that validated before and has since been written only in
/// its small parts and in the keyring entries `touched` names: the same check as
/// [`Home::read`], at the cost of the entries written rather than of every document.
pub fn validate_touched<D: ReadDoc>(doc: &D, touched: &Touched) -> Result<()> {
    keyring_entries(doc, touched).map(|_| ())
}

/// Reads the small parts of the home (name, devices, paired homes) and the keyring
/// entries `touched` names (all of them for [`Touched::Everything`]). An entry that is
/// no longer there is skipped.
pub fn keyring_entries<D: ReadDoc>(doc: &D, touched: &Touched) -> Result<WrappedKeys> {
    let (mut home, k) = read_without_keyring(doc)?;
    match touched {
        Touched::Everything => {
            for doc_text in keys(doc, &k) {
                read_keyring_entry(doc, &k, &doc_text, &mut home.keyring)?;
            }
        }
        Touched::Entries(entries) => {
            for doc_text in entries {
                let present = doc
                    .get(&k, doc_text.as_str())
                    .map_err(|e| Error::schema(join("home.keyring", doc_text), e.to_string()))?
                    .is_some();
                if present {
                    read_keyring_entry(doc, &k, doc_text, &mut home.keyring)?;
                }
            }
        }
    }
    Ok(home.keyring)
}

/// The home view with an empty keyring, and the keyring map's id.
fn read_without_keyring<D: ReadDoc>(doc: &D) -> Result<(Home, automerge::ObjId)> {
    let h = req_map(doc, &ROOT, HOME_KEY, HOME_KEY)?;
    let name = req_str(doc, &h, "name", "home.name")?;
    let devices = read_devices(doc, &h)?;
    let paired = read_paired(doc, &h)?;
    let k = req_map(doc, &h, "keyring", "home.keyring")?;
    Ok((
        Home {
            name,
            devices,
            paired,
            keyring: BTreeMap::new(),
        },
        k,
    ))
}

fn read_keyring_entry<D: ReadDoc>(
    doc: &D,
    k: &automerge::ObjId,
    doc_text: &str,
    keyring: &mut WrappedKeys,
) -> Result<()> {
    let p = join("home.keyring", doc_text);
    let doc_id = DocId::parse(doc_text)
        .ok_or_else(|| Error::schema(&p, "key is not a base58 document id"))?;
    let epochs = req_map(doc, k, doc_text, &p)?;
    for epoch_text in keys(doc, &epochs) {
        let ep = join(&p, &epoch_text);
        let epoch = parse_epoch_key(&epoch_text)
            .ok_or_else(|| Error::schema(&ep, "key is not an epoch"))?;
        let wraps = req_map(doc, &epochs, &epoch_text, &ep)?;
        let mut by_device = BTreeMap::new();
        for peer in keys(doc, &wraps) {
            let wrapped = req_bytes(doc, &wraps, &peer, &join(&ep, &peer))?;
            by_device.insert(peer, wrapped);
        }
        keyring.insert((doc_id, epoch), by_device);
    }
    Ok(())
}

/// Reads only the home's device records: what wrapping a new document's key for every
/// device needs, without reading the keyring, which grows with every document.
pub fn devices<D: ReadDoc>(doc: &D) -> Result<BTreeMap<String, DeviceRecord>> {
    let h = req_map(doc, &ROOT, HOME_KEY, HOME_KEY)?;
    read_devices(doc, &h)
}

/// Reads only the paired homes: what admitting a device of another home needs, without
/// the keyring.
pub fn paired<D: ReadDoc>(doc: &D) -> Result<BTreeMap<String, PairedHome>> {
    let h = req_map(doc, &ROOT, HOME_KEY, HOME_KEY)?;
    read_paired(doc, &h)
}

fn read_paired<D: ReadDoc>(doc: &D, h: &automerge::ObjId) -> Result<BTreeMap<String, PairedHome>> {
    let ph = req_map(doc, h, "paired", "home.paired")?;
    let mut paired = BTreeMap::new();
    for home_id in keys(doc, &ph) {
        let p = join("home.paired", &home_id);
        let rec = req_map(doc, &ph, &home_id, &p)?;
        let dp = join(&p, "devices");
        let devs = req_map(doc, &rec, "devices", &dp)?;
        let mut their = BTreeMap::new();
        for peer in keys(doc, &devs) {
            let cert = req_bytes(doc, &devs, &peer, &join(&dp, &peer))?;
            their.insert(peer, cert);
        }
        paired.insert(
            home_id,
            PairedHome {
                name: req_str(doc, &rec, "name", &join(&p, "name"))?,
                root_key: req_bytes(doc, &rec, "root_key", &join(&p, "root_key"))?,
                devices: their,
                by: opt_str(doc, &rec, "by", &join(&p, "by"))?,
                accept_alerts: opt_bool(doc, &rec, "accept_alerts", &join(&p, "accept_alerts"))?,
            },
        );
    }
    Ok(paired)
}

/// An optional boolean field; absent is `false`, anything but a boolean is an error.
fn opt_bool<D: ReadDoc>(doc: &D, obj: &automerge::ObjId, key: &str, path: &str) -> Result<bool> {
    match doc.get(obj, key).map_err(am)? {
        None => Ok(false),
        Some((automerge::Value::Scalar(s), _)) => match s.as_ref() {
            ScalarValue::Boolean(b) => Ok(*b),
            _ => Err(Error::schema(path, "expected a boolean")),
        },
        Some(_) => Err(Error::schema(path, "expected a boolean")),
    }
}

/// Sets whether this home takes emergency alerts from paired home `home_id`. Fails if
/// the home is not paired.
pub fn set_paired_accept_alerts<T: Transactable>(
    doc: &mut T,
    home_id: &str,
    accept: bool,
) -> Result<()> {
    let h = req_map(doc, &ROOT, HOME_KEY, HOME_KEY)?;
    let ph = req_map(doc, &h, "paired", "home.paired")?;
    let rec = req_map(doc, &ph, home_id, &join("home.paired", home_id))?;
    doc.put(&rec, "accept_alerts", ScalarValue::Boolean(accept))
        .map_err(am)?;
    Ok(())
}

/// Adds (or replaces) one device certificate of a paired home. Fails if the home is not
/// paired.
pub fn put_paired_device<T: Transactable>(
    doc: &mut T,
    home_id: &str,
    peer: &str,
    certificate: &[u8],
) -> Result<()> {
    let h = req_map(doc, &ROOT, HOME_KEY, HOME_KEY)?;
    let ph = req_map(doc, &h, "paired", "home.paired")?;
    let p = join("home.paired", home_id);
    let rec = req_map(doc, &ph, home_id, &p)?;
    let devs = req_map(doc, &rec, "devices", &join(&p, "devices"))?;
    doc.put(&devs, peer, ScalarValue::Bytes(certificate.to_vec()))
        .map_err(am)?;
    Ok(())
}

fn read_devices<D: ReadDoc>(
    doc: &D,
    h: &automerge::ObjId,
) -> Result<BTreeMap<String, DeviceRecord>> {
    let d = req_map(doc, h, "devices", "home.devices")?;
    let mut devices = BTreeMap::new();
    for peer in keys(doc, &d) {
        let p = join("home.devices", &peer);
        let rec = req_map(doc, &d, &peer, &p)?;
        devices.insert(
            peer,
            DeviceRecord {
                name: req_str(doc, &rec, "name", &join(&p, "name"))?,
                certificate: req_bytes(doc, &rec, "certificate", &join(&p, "certificate"))?,
                revoked_at: opt_u64(doc, &rec, "revoked_at", &join(&p, "revoked_at"))?,
            },
        );
    }
    Ok(devices)
}

/// Creates the home layout with its name.
pub(crate) fn init<T: Transactable>(doc: &mut T, name: &str) -> Result<()> {
    let h = ensure_map(doc, &ROOT, HOME_KEY)?;
    doc.put(&h, "name", name).map_err(am)?;
    for key in ["devices", "paired", "keyring"] {
        ensure_map(doc, &h, key)?;
    }
    Ok(())
}

/// Renames the home.
pub fn set_name<T: Transactable>(doc: &mut T, name: &str) -> Result<()> {
    let h = ensure_map(doc, &ROOT, HOME_KEY)?;
    doc.put(&h, "name", name).map_err(am)?;
    Ok(())
}

/// Adds or replaces a member device.
pub fn put_device<T: Transactable>(doc: &mut T, peer: &str, record: &DeviceRecord) -> Result<()> {
    let h = ensure_map(doc, &ROOT, HOME_KEY)?;
    let d = ensure_map(doc, &h, "devices")?;
    let rec = doc
        .put_object(&d, peer, automerge::ObjType::Map)
        .map_err(am)?;
    doc.put(&rec, "name", record.name.as_str()).map_err(am)?;
    doc.put(
        &rec,
        "certificate",
        ScalarValue::Bytes(record.certificate.clone()),
    )
    .map_err(am)?;
    if let Some(at) = record.revoked_at {
        doc.put(&rec, "revoked_at", ScalarValue::Uint(at))
            .map_err(am)?;
    }
    Ok(())
}

/// Marks a device revoked at `at_ms`. Fails if the device is unknown.
pub fn revoke_device<T: Transactable>(doc: &mut T, peer: &str, at_ms: u64) -> Result<()> {
    let h = req_map(doc, &ROOT, HOME_KEY, HOME_KEY)?;
    let d = req_map(doc, &h, "devices", "home.devices")?;
    let rec = req_map(doc, &d, peer, &join("home.devices", peer))?;
    doc.put(&rec, "revoked_at", ScalarValue::Uint(at_ms))
        .map_err(am)?;
    Ok(())
}

/// Adds or replaces a paired home.
pub fn put_paired_home<T: Transactable>(
    doc: &mut T,
    home_id: &str,
    home: &PairedHome,
) -> Result<()> {
    let h = ensure_map(doc, &ROOT, HOME_KEY)?;
    let ph = ensure_map(doc, &h, "paired")?;
    let rec = doc
        .put_object(&ph, home_id, automerge::ObjType::Map)
        .map_err(am)?;
    doc.put(&rec, "name", home.name.as_str()).map_err(am)?;
    doc.put(&rec, "root_key", ScalarValue::Bytes(home.root_key.clone()))
        .map_err(am)?;
    if let Some(by) = &home.by {
        doc.put(&rec, "by", by.as_str()).map_err(am)?;
    }
    if home.accept_alerts {
        doc.put(&rec, "accept_alerts", ScalarValue::Boolean(true))
            .map_err(am)?;
    }
    let devs = doc
        .put_object(&rec, "devices", automerge::ObjType::Map)
        .map_err(am)?;
    for (peer, cert) in &home.devices {
        doc.put(&devs, peer.as_str(), ScalarValue::Bytes(cert.clone()))
            .map_err(am)?;
    }
    Ok(())
}

/// Signed device revocations, by PeerId of the revoked device: this home's own and
/// those paired homes sent. The bytes are opaque here; the node verifies each against
/// the root key of the home it names and ignores any that do not verify. The map is
/// only ever added to, and the node keeps its own add-only copy, so deleting an entry
/// here undoes nothing.
pub fn revocations<D: ReadDoc>(doc: &D) -> Result<BTreeMap<String, Vec<u8>>> {
    let h = req_map(doc, &ROOT, HOME_KEY, HOME_KEY)?;
    let Some((automerge::Value::Object(automerge::ObjType::Map), r)) =
        doc.get(&h, REVOCATIONS_KEY).map_err(am)?
    else {
        return Ok(BTreeMap::new());
    };
    let mut out = BTreeMap::new();
    for peer in keys(doc, &r) {
        let p = join(&join("home", REVOCATIONS_KEY), &peer);
        out.insert(peer.clone(), req_bytes(doc, &r, &peer, &p)?);
    }
    Ok(out)
}

/// Adds a signed revocation of device `peer`.
pub fn put_revocation<T: Transactable>(doc: &mut T, peer: &str, record: &[u8]) -> Result<()> {
    let h = ensure_map(doc, &ROOT, HOME_KEY)?;
    let r = ensure_map(doc, &h, REVOCATIONS_KEY)?;
    doc.put(&r, peer, ScalarValue::Bytes(record.to_vec()))
        .map_err(am)?;
    Ok(())
}

/// Key of the signed lock arbiter namings under the home map.
const LOCK_ARBITERS_KEY: &str = "lock_arbiters";

/// The signed namings of the home's lock arbiter, by their sequence number (decimal
/// text). The bytes are opaque here; the node verifies each against the home's root key
/// and keeps the highest that verifies, so deleting or rewriting an entry undoes nothing
/// (and the node also passes namings on over the lock channel). Entries that are not
/// bytes are skipped, so one bad entry cannot hide the others.
pub fn lock_arbiters<D: ReadDoc>(doc: &D) -> Result<Vec<Vec<u8>>> {
    let h = req_map(doc, &ROOT, HOME_KEY, HOME_KEY)?;
    let Some((automerge::Value::Object(automerge::ObjType::Map), m)) =
        doc.get(&h, LOCK_ARBITERS_KEY).map_err(am)?
    else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for seq in keys(doc, &m) {
        for (value, _) in doc.get_all(&m, seq.as_str()).map_err(am)? {
            if let automerge::Value::Scalar(s) = value
                && let ScalarValue::Bytes(b) = s.as_ref()
            {
                out.push(b.clone());
            }
        }
    }
    Ok(out)
}

/// Adds a signed naming of the home's lock arbiter under its sequence number.
pub fn put_lock_arbiter<T: Transactable>(doc: &mut T, seq: u64, record: &[u8]) -> Result<()> {
    let h = ensure_map(doc, &ROOT, HOME_KEY)?;
    let m = ensure_map(doc, &h, LOCK_ARBITERS_KEY)?;
    doc.put(&m, seq.to_string(), ScalarValue::Bytes(record.to_vec()))
        .map_err(am)?;
    Ok(())
}

/// Deletes the revocation of `peer` from the document. Nothing the node does calls this
/// (the set is add-only); it exists to show that deleting an entry undoes nothing.
pub fn remove_revocation<T: Transactable>(doc: &mut T, peer: &str) -> Result<()> {
    let h = ensure_map(doc, &ROOT, HOME_KEY)?;
    let r = ensure_map(doc, &h, REVOCATIONS_KEY)?;
    doc.delete(&r, peer).map_err(am)?;
    Ok(())
}

/// Forgets a paired home.
pub fn remove_paired_home<T: Transactable>(doc: &mut T, home_id: &str) -> Result<()> {
    let h = ensure_map(doc, &ROOT, HOME_KEY)?;
    let ph = ensure_map(doc, &h, "paired")?;
    doc.delete(&ph, home_id).map_err(am)?;
    Ok(())
}

/// Stores the key of (`target`, `epoch`) wrapped for device `peer`.
pub fn put_wrapped_key<T: Transactable>(
    doc: &mut T,
    target: DocId,
    epoch: &KeyEpoch,
    peer: &str,
    wrapped: &[u8],
) -> Result<()> {
    let h = ensure_map(doc, &ROOT, HOME_KEY)?;
    let k = ensure_map(doc, &h, "keyring")?;
    let per_doc = ensure_map(doc, &k, &target.to_string())?;
    let per_epoch = ensure_map(doc, &per_doc, &epoch_key(epoch))?;
    doc.put(&per_epoch, peer, ScalarValue::Bytes(wrapped.to_vec()))
        .map_err(am)?;
    Ok(())
}

/// Removes every wrapped key of `target` (a deleted generation of an entity), so the
/// keyring holds only documents that still exist.
pub fn remove_wrapped_keys<T: Transactable>(doc: &mut T, target: DocId) -> Result<()> {
    let h = ensure_map(doc, &ROOT, HOME_KEY)?;
    let k = ensure_map(doc, &h, "keyring")?;
    if doc.get(&k, target.to_string()).map_err(am)?.is_some() {
        doc.delete(&k, target.to_string()).map_err(am)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::AutoCommit;

    #[test]
    fn home_round_trips() {
        let mut doc = AutoCommit::new();
        init(&mut doc, "Maple St").unwrap();
        let dev = DeviceRecord {
            name: "kitchen".into(),
            certificate: vec![1, 2, 3],
            revoked_at: None,
        };
        put_device(&mut doc, "peerA", &dev).unwrap();
        revoke_device(&mut doc, "peerA", 77).unwrap();
        let other = PairedHome {
            name: "Oak Ave".into(),
            root_key: vec![9; 32],
            devices: [("peerX".to_string(), vec![4, 5])].into(),
            by: Some("peerA".into()),
            accept_alerts: false,
        };
        put_paired_home(&mut doc, "homeB", &other).unwrap();
        assert!(revocations(&doc).unwrap().is_empty());
        put_revocation(&mut doc, "peerA", &[1, 2, 3]).unwrap();
        assert_eq!(revocations(&doc).unwrap()["peerA"], vec![1, 2, 3]);
        assert!(lock_arbiters(&doc).unwrap().is_empty());
        put_lock_arbiter(&mut doc, 7, &[4, 2]).unwrap();
        put_lock_arbiter(&mut doc, 9, &[5]).unwrap();
        assert_eq!(lock_arbiters(&doc).unwrap(), vec![vec![4, 2], vec![5]]);
        let d = DocId::from_bytes([3; 16]);
        let epoch = KeyEpoch {
            counter: 2,
            device: [7; 16],
        };
        put_wrapped_key(&mut doc, d, &epoch, "peerA", &[8; 48]).unwrap();

        let home = Home::read(&doc).unwrap();
        assert_eq!(home.name, "Maple St");
        assert_eq!(home.devices["peerA"].revoked_at, Some(77));
        assert_eq!(home.paired["homeB"], other);
        assert_eq!(home.keyring[&(d, epoch)]["peerA"], vec![8; 48]);

        // Opting in to a paired home's alerts, and out again; an unpaired home fails.
        set_paired_accept_alerts(&mut doc, "homeB", true).unwrap();
        assert!(paired(&doc).unwrap()["homeB"].accept_alerts);
        set_paired_accept_alerts(&mut doc, "homeB", false).unwrap();
        assert!(!paired(&doc).unwrap()["homeB"].accept_alerts);
        assert!(set_paired_accept_alerts(&mut doc, "homeZ", true).is_err());
        let h = doc.get(&ROOT, HOME_KEY).unwrap().unwrap().1;
        let ph = doc.get(&h, "paired").unwrap().unwrap().1;
        let rec = doc.get(&ph, "homeB").unwrap().unwrap().1;
        doc.put(&rec, "accept_alerts", "yes").unwrap();
        assert!(paired(&doc).is_err(), "a non-boolean opt-in read as one");
        doc.put(&rec, "accept_alerts", true).unwrap();

        remove_paired_home(&mut doc, "homeB").unwrap();
        assert!(Home::read(&doc).unwrap().paired.is_empty());
    }

    #[test]
    fn epoch_keys_round_trip_and_garbage_is_refused() {
        let e = KeyEpoch {
            counter: u64::MAX,
            device: [0xab; 16],
        };
        assert_eq!(parse_epoch_key(&epoch_key(&e)), Some(e));
        for bad in [
            "",
            "-",
            "1-2",
            "0000000000000001-ééééééééééééééé",
            "zzzzzzzzzzzzzzzz-00000000000000000000000000000000",
        ] {
            assert_eq!(parse_epoch_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn bad_keyring_entries_name_their_path() {
        let mut doc = AutoCommit::new();
        init(&mut doc, "h").unwrap();
        let h = req_map(&doc, &ROOT, HOME_KEY, HOME_KEY).unwrap();
        let k = req_map(&doc, &h, "keyring", "").unwrap();
        doc.put_object(&k, "not-a-doc", automerge::ObjType::Map)
            .unwrap();
        let err = Home::read(&doc).unwrap_err();
        assert!(
            matches!(&err, Error::Schema { path, .. } if path == "home.keyring.not-a-doc"),
            "{err}"
        );
    }
}
