//! Joining a home as a new device: `hearth join CODE --data DIR`, without a running node.
//!
//! The joiner proves it holds the invite secret (SPAKE2, inside the Noise channel to the
//! issuer), receives its certificate and the home's keys in a sealed grant, stores them,
//! and exits. `hearth up` on the same data dir then starts the device, which keeps the
//! issuer dialled and syncs the home's documents from it.

use std::time::Duration;

use hearth_net::{DeviceIdentity, Multiaddr};
use hearth_storage::{Batch, KeySource, Keyspace};
use serde_bytes::ByteBuf;
use tokio_util::sync::CancellationToken;

use crate::core::keyring::{self, Keyring};
use crate::home::HomeRecord;
use crate::pairing::service::JoinPackage;
use crate::records::CERT_KEY;
use crate::records::HOME_KEY;
use crate::records::{IDENTITY_KEY, NAME_KEY, STATIC_PEERS_KEY};
use crate::trust::cert::{DeviceCert, Verdict};
use crate::trust::invite::{InviteCode, InviteKind};
use crate::trust::keys::DocKey;
use crate::trust::pake::{Joiner, JoinerInfo, MAX_GRANT_LEN};
use crate::trust::wire::from_cbor;
use crate::{Config, Error, datadir};

/// How long the whole exchange may take.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The home a device joined.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Joined {
    /// The home's HomeId.
    pub home_id: crate::HomeId,
    /// The home's name.
    pub home_name: String,
    /// This device's PeerId.
    pub peer_id: crate::DeviceId,
}

pub(crate) async fn join(code: &str, config: &Config) -> Result<Joined, Error> {
    let dir = &config.data_dir;
    datadir::ensure_dir(dir)?;
    let _lock = datadir::lock(dir)?;
    if dir.join(hearth_storage::STORE_DIR).exists() {
        return Err(Error::Conflict(format!(
            "data dir {} already holds a home; join with an empty or new --data dir",
            dir.display()
        )));
    }
    let now_s = crate::core::now_ms() / 1000;
    let code = InviteCode::parse(code.trim(), now_s).map_err(|e| Error::Pairing(e.to_string()))?;
    if code.kind() != InviteKind::Device {
        return Err(Error::Invalid(
            "this is a home invite (pairing two homes), which this version cannot use yet; \
             ask for a device invite with `hearth invite`"
                .into(),
        ));
    }
    let result = tokio::time::timeout(JOIN_TIMEOUT, run(&code, config))
        .await
        .unwrap_or_else(|_| {
            Err(Error::Pairing(format!(
                "the issuer did not answer within {JOIN_TIMEOUT:?}; is its node running and reachable?"
            )))
        });
    if result.is_err() {
        // Nothing of a failed join may look like a home: remove what it wrote.
        let _ = std::fs::remove_dir_all(dir.join(hearth_storage::STORE_DIR));
        let _ = std::fs::remove_file(dir.join(hearth_storage::KEY_FILE));
    }
    result
}

async fn run(code: &InviteCode, config: &Config) -> Result<Joined, Error> {
    let key = match &config.passphrase {
        Some(p) => KeySource::Passphrase(p.0.clone()),
        None => KeySource::KeyFile,
    };
    let open_dir = config.data_dir.clone();
    let store = tokio::task::spawn_blocking(move || hearth_storage::open(&open_dir, key))
        .await
        .map_err(|e| Error::Task(e.to_string()))??;
    let outcome = exchange(code, config, &store).await;
    store.close().await?;
    outcome
}

async fn exchange(
    code: &InviteCode,
    config: &Config,
    store: &hearth_storage::StoreHandle,
) -> Result<Joined, Error> {
    let identity = DeviceIdentity::generate();
    let mut batch = Batch::new();
    let device = keyring::device_secret(store, &mut batch).await?;
    let device_name = config
        .device_name
        .clone()
        .unwrap_or_else(crate::node::host_name);

    let cancel = CancellationToken::new();
    let (net, _events, net_loop) = hearth_net::new(hearth_net::Config {
        identity: identity.clone(),
        listen: Vec::new(),
        mdns: false,
        ..hearth_net::Config::default()
    })
    .map_err(|e| Error::Network(e.to_string()))?;
    let net_task = tokio::spawn(net_loop.run(cancel.clone()));
    let info = JoinerInfo {
        x25519_public: device.public(),
        device_name: device_name.clone(),
        extra: ByteBuf::new(),
    };
    let outcome = exchange_with_issuer(&net, code, &identity.to_peer_id(), info).await;
    // Close the pairing connection explicitly, so the issuer sees it end now rather than
    // holding it (unadmitted) until its hello deadline while this device reconnects.
    let _ = net.disconnect(*code.issuer()).await;
    cancel.cancel();
    let _ = net_task.await;
    let grant = outcome?;

    let package: JoinPackage = from_cbor("join package", &grant.home, MAX_GRANT_LEN)
        .map_err(|e| Error::Pairing(format!("the grant is malformed: {e}")))?;
    if package.home_id != code.home_id() {
        return Err(Error::Pairing(
            "the grant names another home than the code".into(),
        ));
    }
    let record = HomeRecord {
        home_id: package.home_id.clone(),
        name: package.name.clone(),
        root_public: package.root_public,
        root_secret: None,
        home_doc: package.home_doc,
        registry_doc: package.registry_doc,
    };
    match DeviceCert::verify_bytes(&grant.certificate, &record.root_public) {
        Verdict::Valid(cert) if cert.peer_id() == identity.peer_id() => {}
        other => {
            return Err(Error::Pairing(format!(
                "the certificate in the grant does not check out: {other:?}"
            )));
        }
    }
    let mut ring = Keyring::default();
    for (doc, epoch, key) in &package.keys {
        ring.insert(*doc, *epoch, DocKey::from_bytes(*key), &mut batch);
    }
    batch.put(Keyspace::Meta, IDENTITY_KEY.to_vec(), identity.to_bytes());
    batch.put(Keyspace::Meta, NAME_KEY.to_vec(), device_name.into_bytes());
    batch.put(
        Keyspace::Meta,
        CERT_KEY.to_vec(),
        grant.certificate.to_vec(),
    );
    batch.put(
        Keyspace::Meta,
        STATIC_PEERS_KEY.to_vec(),
        crate::records::to_json("static peers", &package.peers)?,
    );
    // The home record last in the same atomic batch: a store either holds a whole
    // membership or none.
    batch.put(Keyspace::Meta, HOME_KEY.to_vec(), record.encode()?);
    store.batch(batch).await?;
    crate::audit::record(store, "device.joined", &record.home_id).await;
    Ok(Joined {
        home_id: record.home_id.into(),
        home_name: record.name,
        peer_id: identity.peer_id().into(),
    })
}

/// The joining side of the pairing exchange over `net`: proves the code to its issuer
/// (trying each address the code names) and returns the grant. Device joins run it on a
/// throwaway network; home pairing on the running node's.
pub(crate) async fn exchange_with_issuer(
    net: &hearth_net::Handle,
    code: &InviteCode,
    me: &hearth_net::PeerId,
    info: JoinerInfo,
) -> Result<crate::trust::pake::Grant, Error> {
    let issuer = *code.issuer();
    let (joiner, start) = Joiner::start(code, me, info, crate::core::now_ms() / 1000)
        .map_err(|e| Error::Pairing(e.to_string()))?;
    let mut reply = None;
    let mut last_error = String::from("the invite code names no address");
    for addr in code.addrs() {
        let Ok(addr) = addr.parse::<Multiaddr>() else {
            continue;
        };
        match net
            .pair_request(issuer, Some(addr.clone()), start.clone())
            .await
        {
            Ok(bytes) => {
                reply = Some(bytes);
                break;
            }
            Err(e) => last_error = format!("{addr}: {e}"),
        }
    }
    let reply = reply
        .ok_or_else(|| Error::Pairing(format!("cannot reach the issuing node ({last_error})")))?;
    let (awaiting, confirm) = joiner
        .receive_reply(&reply)
        .map_err(|f| Error::Pairing(f.error.to_string()))?;
    let grant_bytes = net
        .pair_request(issuer, None, confirm)
        .await
        .map_err(|e| Error::Pairing(format!("the issuer stopped answering: {e}")))?;
    awaiting
        .receive_grant(&grant_bytes)
        .map_err(|f| Error::Pairing(f.error.to_string()))
}
