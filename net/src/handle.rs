//! The cheap, cloneable handle through which the node drives the network.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};

use crate::Error;
use crate::behaviour::StreamKind;
use crate::event::{Counters, Metrics, PeerClass, PeerInfo, SendOutcome, bump};
use crate::pair::{MAX_PAIR_MESSAGE_SIZE, PairRequestId};
use crate::stream::{Outbox, PushError};

/// Capacity of the command channel from handles to the event loop.
pub(crate) const COMMAND_CAPACITY: usize = 64;

/// State the handles read without a round trip through the event loop.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Outbound queues of admitted peers. A std mutex, not a tokio one: it is held only
    /// for a map lookup and a `try_send`, never across an await, and `send` is the hot
    /// path, where an extra hop through the event loop would add latency to every frame.
    outboxes: Mutex<HashMap<PeerId, PeerOutboxes>>,
    pub(crate) counters: Arc<Counters>,
}

/// One admitted peer's queues, tagged with the session they belong to so a stale slow-peer
/// report cannot drop a peer that has since reconnected.
#[derive(Debug)]
pub(crate) struct PeerOutboxes {
    pub(crate) session: u64,
    pub(crate) queues: [Outbox; 2],
}

impl Shared {
    pub(crate) fn outboxes(&self) -> MutexGuard<'_, HashMap<PeerId, PeerOutboxes>> {
        // A panic while holding this lock cannot leave the map half-updated (every
        // critical section is a single insert, remove or try_send), so poisoning is ignored.
        self.outboxes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes a peer's queues if they still belong to `session`.
    pub(crate) fn remove_outboxes(&self, peer: &PeerId, session: u64) {
        let mut map = self.outboxes();
        if map.get(peer).is_some_and(|o| o.session == session) {
            map.remove(peer);
        }
    }
}

/// A request to the event loop; each carries the oneshot its answer goes back on.
#[derive(Debug)]
pub(crate) enum Command {
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    ConnectedPeers {
        reply: oneshot::Sender<Vec<PeerInfo>>,
    },
    KnownPeers {
        reply: oneshot::Sender<Vec<crate::KnownPeer>>,
    },
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<PeerId, Error>>,
    },
    AddStaticPeer {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<PeerId, Error>>,
    },
    RemoveStaticPeer {
        peer: PeerId,
        reply: oneshot::Sender<bool>,
    },
    RetryRejected {
        reply: oneshot::Sender<usize>,
    },
    Admit {
        peer: PeerId,
        class: PeerClass,
        reply: oneshot::Sender<bool>,
    },
    ReservePeer {
        peer: PeerId,
        reply: oneshot::Sender<()>,
    },
    Reject {
        peer: PeerId,
        reason: String,
        reply: oneshot::Sender<bool>,
    },
    Disconnect {
        peer: PeerId,
        reply: oneshot::Sender<bool>,
    },
    SetCertificate {
        certificate: Vec<u8>,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    PairRequest {
        peer: PeerId,
        addr: Option<Multiaddr>,
        bytes: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>, Error>>,
    },
    PairRespond {
        request_id: PairRequestId,
        bytes: Vec<u8>,
        reply: oneshot::Sender<bool>,
    },
    /// Sent by a handle whose `send` found the sync queue full.
    SlowPeer {
        peer: PeerId,
        session: u64,
        queued_frames: usize,
        queued_bytes: usize,
    },
}

/// Drives the network: dial, admit, send. Cheap to clone; every clone talks to the same
/// event loop. Once the loop has stopped, every call returns [`Error::Shutdown`].
#[derive(Clone)]
pub struct Handle {
    local: PeerId,
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handle")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl Handle {
    pub(crate) fn new(local: PeerId, commands: mpsc::Sender<Command>, shared: Arc<Shared>) -> Self {
        Self {
            local,
            commands,
            shared,
        }
    }

    /// This node's PeerId.
    pub fn local_peer_id(&self) -> PeerId {
        self.local
    }

    /// Counters since the event loop started. Reads atomics; never waits.
    pub fn metrics(&self) -> Metrics {
        self.shared.counters.snapshot()
    }

    /// Queues `frame` on the peer's long-lived `/hearth/sync/1` stream.
    ///
    /// Never waits for the network: the frame goes into a per-peer bounded queue. If that
    /// queue is full the peer is too slow; it is disconnected and
    /// [`SendOutcome::SlowPeerDropped`] is returned, so one stuck peer cannot grow this
    /// node's memory or hold up the others. Frames for a peer that is admitted but whose
    /// stream is still opening are queued and go out once it is up.
    ///
    /// Cancel-safe: the frame is either queued or not when the future is dropped.
    pub async fn send(&self, peer: PeerId, frame: Bytes) -> Result<SendOutcome, Error> {
        self.send_on(StreamKind::Sync, peer, frame).await
    }

    /// Queues `frame` on the peer's `/hearth/ephemeral/1` stream.
    ///
    /// Like [`Handle::send`], except that a full queue discards this message
    /// ([`SendOutcome::Shed`]) and keeps the peer: ephemeral messages expire anyway.
    ///
    /// Cancel-safe.
    pub async fn send_ephemeral(&self, peer: PeerId, frame: Bytes) -> Result<SendOutcome, Error> {
        self.send_on(StreamKind::Ephemeral, peer, frame).await
    }

    async fn send_on(
        &self,
        kind: StreamKind,
        peer: PeerId,
        frame: Bytes,
    ) -> Result<SendOutcome, Error> {
        if frame.len() > kind.max_frame() {
            return Err(Error::FrameTooLarge {
                len: frame.len(),
                max: kind.max_frame(),
            });
        }
        let (result, session) = {
            let map = self.shared.outboxes();
            let Some(outboxes) = map.get(&peer) else {
                return Ok(SendOutcome::NotReady);
            };
            (outboxes.queues[kind.index()].push(frame), outboxes.session)
        };
        match result {
            Ok(()) => Ok(SendOutcome::Queued),
            Err(PushError::Closed) => Ok(SendOutcome::NotReady),
            Err(PushError::Full { .. }) if kind == StreamKind::Ephemeral => {
                bump(&self.shared.counters.ephemeral_shed, 1);
                Ok(SendOutcome::Shed)
            }
            Err(PushError::Full { frames, bytes }) => {
                // Stop further sends at once; the event loop does the disconnecting.
                self.shared.remove_outboxes(&peer, session);
                let report = Command::SlowPeer {
                    peer,
                    session,
                    queued_frames: frames,
                    queued_bytes: bytes,
                };
                self.commands
                    .send(report)
                    .await
                    .map_err(|_| Error::Shutdown)?;
                Ok(SendOutcome::SlowPeerDropped)
            }
        }
    }

    /// The addresses the node currently listens on.
    ///
    /// Cancel-safe.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, Error> {
        self.request(|reply| Command::ListenAddrs { reply }).await
    }

    /// Every connected peer, admitted or not.
    ///
    /// Cancel-safe.
    pub async fn connected_peers(&self) -> Result<Vec<PeerInfo>, Error> {
        self.request(|reply| Command::ConnectedPeers { reply })
            .await
    }

    /// Peers this node knows of but is not connected to: its static peers, and the peers
    /// mDNS reported (at most [`crate::MAX_DISCOVERED_PEERS`]), with their addresses.
    ///
    /// Cancel-safe.
    pub async fn known_peers(&self) -> Result<Vec<crate::KnownPeer>, Error> {
        self.request(|reply| Command::KnownPeers { reply }).await
    }

    /// Dials `addr` once and waits until the connection is up or has failed.
    ///
    /// With a `/p2p/<peer id>` suffix the remote must prove that identity; without one any
    /// peer is accepted. Returns the remote PeerId. The connection still goes through the
    /// hello exchange and admission like any other. Not retried; use
    /// [`Handle::add_static_peer`] for a peer that must stay connected.
    ///
    /// Cancel-safe: dropping the future does not abort the dial.
    pub async fn dial(&self, addr: Multiaddr) -> Result<PeerId, Error> {
        self.request(|reply| Command::Dial { addr, reply }).await?
    }

    /// Adds a peer (`/ip4/../tcp/N/p2p/<peer id>`) to keep dialled, with exponential
    /// backoff between attempts, whichever PeerId is smaller. Replaces the address if the
    /// peer was already static.
    ///
    /// Cancel-safe.
    pub async fn add_static_peer(&self, addr: Multiaddr) -> Result<PeerId, Error> {
        self.request(|reply| Command::AddStaticPeer { addr, reply })
            .await?
    }

    /// Stops redialling `peer`; an open connection stays. Returns whether it was static.
    ///
    /// Cancel-safe.
    pub async fn remove_static_peer(&self, peer: PeerId) -> Result<bool, Error> {
        self.request(|reply| Command::RemoveStaticPeer { peer, reply })
            .await
    }

    /// Ends the cooldown of every discovered peer the node rejected, so that each is
    /// dialled again at once: what made them strangers changed (a home was paired).
    /// Returns how many were cooling down.
    ///
    /// Cancel-safe.
    pub async fn retry_rejected(&self) -> Result<usize, Error> {
        self.request(|reply| Command::RetryRejected { reply }).await
    }

    /// Vouches for `peer` (one of the home's own devices, say, known from the home
    /// document before it has connected this run): its inbound connections are never
    /// refused by [`crate::Config::max_connections_per_ip`] or
    /// [`crate::Config::max_unknown_inbound`], as for a static peer. Admission alone
    /// exempts a peer from the second cap only. At most [`crate::MAX_RESERVED_PEERS`]
    /// are remembered, oldest forgotten first; [`Handle::reject`] forgets the peer.
    /// It still has to pass the hello and admission as any peer does.
    ///
    /// Cancel-safe.
    pub async fn reserve_peer(&self, peer: PeerId) -> Result<(), Error> {
        self.request(|reply| Command::ReservePeer { peer, reply })
            .await
    }

    /// Admits a connected peer: its sync and ephemeral streams open and frames flow.
    ///
    /// Returns false if the peer is no longer connected or was already rejected. Until a
    /// peer is admitted it may use only the hello exchange, and it is disconnected once
    /// [`crate::Config::hello_timeout`] has passed since it connected.
    ///
    /// `class` says what the peer is to the node; every frame it sends carries it (see
    /// [`crate::Event::Frame`]). A peer already admitted as another class stays as it was,
    /// and the call returns false.
    ///
    /// Cancel-safe.
    pub async fn admit(&self, peer: PeerId, class: PeerClass) -> Result<bool, Error> {
        self.request(|reply| Command::Admit { peer, class, reply })
            .await
    }

    /// Refuses a peer and disconnects it. `reason` is logged and reported in
    /// [`crate::DisconnectReason::Rejected`]; it is not sent to the peer. Returns false if
    /// the peer was not connected.
    ///
    /// Cancel-safe.
    pub async fn reject(&self, peer: PeerId, reason: impl Into<String>) -> Result<bool, Error> {
        let reason = reason.into();
        self.request(|reply| Command::Reject {
            peer,
            reason,
            reply,
        })
        .await
    }

    /// Closes every connection to `peer`. A static peer is redialled later. Returns false
    /// if it was not connected.
    ///
    /// Cancel-safe.
    pub async fn disconnect(&self, peer: PeerId) -> Result<bool, Error> {
        self.request(|reply| Command::Disconnect { peer, reply })
            .await
    }

    /// Replaces the certificate sent in future hello exchanges (for instance after
    /// pairing). Peers already connected keep the one they got.
    ///
    /// Cancel-safe.
    pub async fn set_certificate(&self, certificate: Vec<u8>) -> Result<(), Error> {
        self.request(|reply| Command::SetCertificate { certificate, reply })
            .await?
    }

    /// Sends one pairing message to `peer` on `/hearth/pair/1` and waits for its answer.
    ///
    /// Works before admission, in either direction: a joining device has no certificate
    /// yet, and its hello carries an empty one. If `peer` is not connected, `addr` is
    /// dialled (with or without a `/p2p/<peer id>` suffix; a suffix naming another peer is
    /// refused); call again with `None` for later rounds, which reuse the connection.
    /// While the exchange runs, the peer's admission deadline on both ends is extended
    /// (bounded by [`crate::Config::pairing_max_duration`]).
    ///
    /// Waits at most [`crate::PAIR_CONNECT_TIMEOUT`] for a connection and then
    /// [`crate::PAIR_REQUEST_TIMEOUT`] for the answer. Errors: [`Error::FrameTooLarge`]
    /// over [`MAX_PAIR_MESSAGE_SIZE`] (nothing sent), [`Error::NotConnected`],
    /// [`Error::Dial`], [`Error::PairRefused`] when the peer's network layer turned the
    /// request away (rate limit, capacity), [`Error::PairFailed`] when no answer came.
    ///
    /// Cancel-safe in that nothing is left behind, but a request already sent is not
    /// recalled: the peer may still act on it.
    pub async fn pair_request(
        &self,
        peer: PeerId,
        addr: Option<Multiaddr>,
        bytes: Vec<u8>,
    ) -> Result<Vec<u8>, Error> {
        check_pair_message(&bytes)?;
        self.request(|reply| Command::PairRequest {
            peer,
            addr,
            bytes,
            reply,
        })
        .await?
    }

    /// Answers the pairing request `request_id` from an [`crate::Event::PairRequest`].
    ///
    /// Returns false when the request is no longer waiting: already answered, timed out
    /// ([`crate::PAIR_REQUEST_TIMEOUT`]), or its connection closed. A message over
    /// [`MAX_PAIR_MESSAGE_SIZE`] is refused with [`Error::FrameTooLarge`] and the request
    /// stays open, so a smaller answer can still be sent.
    ///
    /// Cancel-safe.
    pub async fn pair_respond(
        &self,
        request_id: PairRequestId,
        bytes: Vec<u8>,
    ) -> Result<bool, Error> {
        check_pair_message(&bytes)?;
        self.request(|reply| Command::PairRespond {
            request_id,
            bytes,
            reply,
        })
        .await
    }

    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, Error> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| Error::Shutdown)?;
        answer.await.map_err(|_| Error::Shutdown)
    }
}

/// Refuses a pairing message the remote would refuse anyway, before anything is sent.
fn check_pair_message(bytes: &[u8]) -> Result<(), Error> {
    if bytes.len() > MAX_PAIR_MESSAGE_SIZE {
        return Err(Error::FrameTooLarge {
            len: bytes.len(),
            max: MAX_PAIR_MESSAGE_SIZE,
        });
    }
    Ok(())
}
