//! A network with no sockets, for tests of the layers above (feature `testing`).
//!
//! [`detached`] returns a [`Handle`] whose commands a small task answers at once, as a
//! swarm with no peers would: nothing is connected, admitting and rejecting succeed,
//! dialling and pairing fail with [`Error::Shutdown`]. The [`EventStream`] it returns
//! yields whatever the test sends on the returned sender, so a test plays the network:
//! hellos, frames, disconnections.

use std::sync::Arc;

use libp2p::PeerId;
use tokio::sync::{Semaphore, mpsc};

use crate::handle::{COMMAND_CAPACITY, Command, Shared};
use crate::{Error, Event, EventStream, Handle};

/// Events a test may queue for the node before it waits.
pub const DETACHED_EVENTS: usize = 64;

/// A handle and an event stream for `local`, with no swarm behind them, and the sender
/// that feeds the stream. Needs a tokio runtime; the answering task ends with the last
/// handle.
pub fn detached(local: PeerId) -> (Handle, EventStream, mpsc::Sender<Event>) {
    let (commands, mut rx) = mpsc::channel(COMMAND_CAPACITY);
    let handle = Handle::new(local, commands, Arc::new(Shared::default()));
    let (events, control) = mpsc::channel(DETACHED_EVENTS);
    // No frame ever arrives on this channel; its sender is dropped at once.
    let (_, frames) = mpsc::channel(1);
    let stream = EventStream::new(control, frames, Arc::new(Semaphore::new(0)));
    tokio::spawn(async move {
        while let Some(command) = rx.recv().await {
            answer(command);
        }
    });
    (handle, stream, events)
}

/// Answers as a swarm with no peers and no listeners would. A caller that went away is
/// nothing to answer, so send errors are ignored.
fn answer(command: Command) {
    match command {
        Command::ListenAddrs { reply } => {
            let _ = reply.send(Vec::new());
        }
        Command::ConnectedPeers { reply } => {
            let _ = reply.send(Vec::new());
        }
        Command::KnownPeers { reply } => {
            let _ = reply.send(Vec::new());
        }
        Command::Dial { reply, .. } | Command::AddStaticPeer { reply, .. } => {
            let _ = reply.send(Err(Error::Shutdown));
        }
        Command::RemoveStaticPeer { reply, .. } => {
            let _ = reply.send(false);
        }
        Command::RetryRejected { reply } => {
            let _ = reply.send(0);
        }
        Command::Admit { reply, .. }
        | Command::Reject { reply, .. }
        | Command::Disconnect { reply, .. } => {
            let _ = reply.send(true);
        }
        Command::ReservePeer { reply, .. } => {
            let _ = reply.send(());
        }
        Command::SetCertificate { reply, .. } => {
            let _ = reply.send(Ok(()));
        }
        Command::PairRequest { reply, .. } => {
            let _ = reply.send(Err(Error::Shutdown));
        }
        Command::PairRespond { reply, .. } => {
            let _ = reply.send(false);
        }
        Command::SlowPeer { .. } => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_detached_handle_answers_like_an_empty_network() {
        let local = PeerId::random();
        let (handle, mut stream, events) = detached(local);
        assert_eq!(handle.local_peer_id(), local);
        assert!(handle.connected_peers().await.unwrap().is_empty());
        assert!(
            handle
                .admit(PeerId::random(), crate::PeerClass::Own)
                .await
                .unwrap()
        );
        assert!(handle.set_certificate(vec![1, 2, 3]).await.is_ok());
        let addr = format!("/ip4/127.0.0.1/tcp/1/p2p/{}", PeerId::random());
        assert!(handle.dial(addr.parse().unwrap()).await.is_err());
        let peer = PeerId::random();
        events
            .send(Event::PeerConnected {
                peer,
                addr: "/ip4/127.0.0.1/tcp/1".parse().unwrap(),
                outbound: false,
            })
            .await
            .unwrap();
        assert!(
            matches!(stream.recv().await, Some(Event::PeerConnected { peer: p, .. }) if p == peer)
        );
        drop(events);
        assert!(stream.recv().await.is_none());
    }
}
