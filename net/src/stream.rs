//! The long-lived framed streams: per-peer outbound queues and the task that pumps one
//! stream in both directions.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::io::{BufReader, BufWriter};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::PeerId;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::behaviour::StreamKind;
use crate::event::{Counters, Delivery, Event, PeerClass, bump};
use crate::frame;

/// Largest sync frame, checked by the sender and by the receiver before allocating.
pub const MAX_FRAME_SIZE: usize = 4 * 1024 * 1024;

/// Largest ephemeral frame; presence beats and clock probes are small.
pub const MAX_EPHEMERAL_FRAME_SIZE: usize = 64 * 1024;

/// Frames that may wait in one peer's outbound sync queue.
pub const SYNC_QUEUE_FRAMES: usize = 4096;

/// Bytes that may wait in one peer's outbound sync queue. Filling either cap marks the
/// peer slow; the byte cap is what actually bounds memory when frames are large. With the
/// ephemeral queue's cap, one peer holds at most 8 MiB of ours.
pub const SYNC_QUEUE_BYTES: usize = 7 * 1024 * 1024;

/// Frames that may wait in one peer's outbound ephemeral queue.
pub const EPHEMERAL_QUEUE_FRAMES: usize = 256;

/// Bytes that may wait in one peer's outbound ephemeral queue.
pub const EPHEMERAL_QUEUE_BYTES: usize = 1024 * 1024;

/// Received frame bytes held for the consumer across all peers. A reader reserves a
/// frame's length here before allocating it, so a consumer that stops reading stalls the
/// readers (and, through Yamux flow control, the senders) instead of growing memory.
/// Each peer may hold at most [`crate::Config::max_inbound_bytes_per_peer`] of it.
pub const INBOUND_BUFFER_BYTES: usize = 64 * 1024 * 1024;

// The largest frame must fit the budget, or its reader would wait forever.
const _: () = assert!(INBOUND_BUFFER_BYTES >= MAX_FRAME_SIZE);
const _: () = assert!(SYNC_QUEUE_BYTES >= MAX_FRAME_SIZE);
const _: () = assert!(EPHEMERAL_QUEUE_BYTES >= MAX_EPHEMERAL_FRAME_SIZE);
const _: () = assert!(SYNC_QUEUE_BYTES + EPHEMERAL_QUEUE_BYTES <= 8 * 1024 * 1024);

/// Buffer between the stream and the framing code, each direction.
const IO_BUFFER: usize = 64 * 1024;

/// Frames written back to back before an explicit flush, so a deep queue still reaches
/// the wire in bounded time.
const FRAMES_PER_FLUSH: usize = 64;

/// How long opening a stream may take before it is retried.
pub(crate) const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

impl StreamKind {
    pub(crate) fn max_frame(self) -> usize {
        match self {
            Self::Sync => MAX_FRAME_SIZE,
            Self::Ephemeral => MAX_EPHEMERAL_FRAME_SIZE,
        }
    }

    fn queue_caps(self) -> (usize, usize) {
        match self {
            Self::Sync => (SYNC_QUEUE_FRAMES, SYNC_QUEUE_BYTES),
            Self::Ephemeral => (EPHEMERAL_QUEUE_FRAMES, EPHEMERAL_QUEUE_BYTES),
        }
    }

    fn event(self, peer: PeerId, class: PeerClass, bytes: Bytes) -> Event {
        match self {
            Self::Sync => Event::Frame { peer, class, bytes },
            Self::Ephemeral => Event::EphemeralFrame { peer, class, bytes },
        }
    }
}

/// The sending half of one peer's outbound queue, held in the handles' shared map.
#[derive(Debug)]
pub(crate) struct Outbox {
    tx: mpsc::Sender<Bytes>,
    queued_bytes: Arc<AtomicUsize>,
    max_bytes: usize,
}

/// The receiving half, owned by whichever stream task currently writes for the peer.
#[derive(Debug)]
pub(crate) struct OutboxRx {
    rx: mpsc::Receiver<Bytes>,
    queued_bytes: Arc<AtomicUsize>,
    /// A frame whose write failed, sent first on the next stream so a broken stream does
    /// not silently drop it. Its bytes stay counted in `queued_bytes` until written.
    front: Option<Bytes>,
}

impl OutboxRx {
    /// The next frame to write: the retried one first, then the queue.
    async fn next(&mut self) -> Option<Bytes> {
        match self.front.take() {
            Some(frame) => Some(frame),
            None => self.rx.recv().await,
        }
    }

    fn try_next(&mut self) -> Option<Bytes> {
        self.front.take().or_else(|| self.rx.try_recv().ok())
    }
}

/// Why [`Outbox::push`] did not queue a frame.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PushError {
    /// A cap was reached; carries the queue's size at that moment.
    Full { frames: usize, bytes: usize },
    /// The stream side is gone (session ending).
    Closed,
}

impl Outbox {
    pub(crate) fn new(kind: StreamKind) -> (Self, OutboxRx) {
        let (frames, bytes) = kind.queue_caps();
        let (tx, rx) = mpsc::channel(frames);
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        (
            Self {
                tx,
                queued_bytes: queued_bytes.clone(),
                max_bytes: bytes,
            },
            OutboxRx {
                rx,
                queued_bytes,
                front: None,
            },
        )
    }

    /// Queues a frame without waiting; a full queue is reported, never grown.
    pub(crate) fn push(&self, frame: Bytes) -> Result<(), PushError> {
        let len = frame.len();
        // Reserve the bytes first so two concurrent senders cannot both squeeze past the cap.
        let before = self.queued_bytes.fetch_add(len, Ordering::AcqRel);
        if before + len > self.max_bytes {
            self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            return Err(self.full());
        }
        match self.tx.try_send(frame) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
                match e {
                    mpsc::error::TrySendError::Full(_) => Err(self.full()),
                    mpsc::error::TrySendError::Closed(_) => Err(PushError::Closed),
                }
            }
        }
    }

    /// Frames and bytes currently waiting.
    pub(crate) fn queued(&self) -> (usize, usize) {
        (
            self.tx.max_capacity() - self.tx.capacity(),
            self.queued_bytes.load(Ordering::Acquire),
        )
    }

    fn full(&self) -> PushError {
        let (frames, bytes) = self.queued();
        PushError::Full { frames, bytes }
    }
}

/// How long a stream being retired may take to deliver the remote's last frames.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// How a stream task ended.
#[derive(Debug)]
pub(crate) enum StreamEnd {
    /// The event loop cut it off (disconnect, dead connection, shutdown).
    Cancelled,
    /// The event loop retired it gracefully: this side finished its current frame, closed
    /// its half, and read until the remote closed too, so nothing in flight was lost.
    Drained,
    /// The queue's sending side was dropped: the session is over.
    OutboxClosed,
    /// The node dropped its [`crate::EventStream`].
    EventsClosed,
    /// The remote closed the stream on a frame boundary.
    RemoteClosed,
    /// The stream failed underneath (reset, connection lost).
    Io(String),
    /// The remote sent something that is not a valid frame.
    Malformed(String),
    /// A frame's body did not arrive within the frame read timeout; treated as malformed.
    ReadTimeout(Duration),
}

/// Everything a stream task needs; built by the event loop.
pub(crate) struct StreamTask {
    pub(crate) peer: PeerId,
    /// What the peer was admitted as; stamped on every frame read.
    pub(crate) class: PeerClass,
    pub(crate) kind: StreamKind,
    pub(crate) stream: libp2p::Stream,
    pub(crate) outbox: OutboxRx,
    pub(crate) frames: mpsc::Sender<Delivery>,
    pub(crate) budget: Arc<Semaphore>,
    /// This peer's share of `budget`, common to its sync and ephemeral streams.
    pub(crate) peer_budget: Arc<Semaphore>,
    /// Longest a frame's body may take to arrive.
    pub(crate) read_timeout: Duration,
    pub(crate) counters: Arc<Counters>,
    /// Stops the task at once, mid-frame if need be.
    pub(crate) cancel: CancellationToken,
    /// Asks the task to retire the stream at the next frame boundary.
    pub(crate) drain: CancellationToken,
}

impl StreamTask {
    /// Pumps the stream until it ends; hands the queue back so a replacement stream can
    /// carry on with the frames still waiting.
    ///
    /// A stream is retired gracefully from either side: the side that stops finishes the
    /// frame it is writing and closes its half; the other reads that clean end of stream,
    /// does the same, and both read until the other's half is closed. Frames still queued
    /// stay in the queue for the next stream, so replacing a stream loses nothing.
    pub(crate) async fn run(self) -> (OutboxRx, StreamEnd) {
        let Self {
            peer,
            class,
            kind,
            stream,
            mut outbox,
            frames,
            budget,
            peer_budget,
            read_timeout,
            counters,
            cancel,
            drain,
        } = self;
        let (read_half, write_half) = stream.split();
        let mut reader = BufReader::with_capacity(IO_BUFFER, read_half);
        let mut writer = BufWriter::with_capacity(IO_BUFFER, write_half);
        let end = {
            // Reading and writing run as two whole loops raced against each other, not as
            // per-frame select arms, so neither stops halfway through a frame unless the
            // task is cut off.
            let budgets = Budgets {
                shared: &budget,
                peer: &peer_budget,
                read_timeout,
            };
            let read = read_loop(&mut reader, peer, &class, kind, &frames, budgets, &counters);
            let write = write_loop(&mut writer, &mut outbox, &counters, &drain);
            tokio::pin!(read, write);
            tokio::select! {
                () = cancel.cancelled() => StreamEnd::Cancelled,
                end = &mut read => match end {
                    StreamEnd::RemoteClosed => {
                        // The remote sends nothing more; stop writing at a frame boundary.
                        drain.cancel();
                        let _ = bounded(&cancel, &mut write).await;
                        StreamEnd::RemoteClosed
                    }
                    other => other,
                },
                end = &mut write => match end {
                    StreamEnd::Drained | StreamEnd::OutboxClosed => {
                        // Our half is closed; take what the remote still sends until its
                        // half closes too, unless that stream turns out to be garbage.
                        match bounded(&cancel, &mut read).await {
                            Some(bad @ (StreamEnd::Malformed(_) | StreamEnd::ReadTimeout(_))) => {
                                bad
                            }
                            _ => end,
                        }
                    }
                    other => other,
                },
            }
        };
        match end {
            StreamEnd::Malformed(_) => bump(&counters.malformed_frames, 1),
            StreamEnd::ReadTimeout(_) => {
                bump(&counters.malformed_frames, 1);
                bump(&counters.frame_read_timeouts, 1);
            }
            _ => {}
        }
        (outbox, end)
    }
}

/// Runs the rest of a stream loop while retiring it, bounded by the drain timeout and by
/// hard cancellation.
async fn bounded<F>(cancel: &CancellationToken, rest: F) -> Option<StreamEnd>
where
    F: std::future::Future<Output = StreamEnd>,
{
    tokio::select! {
        () = cancel.cancelled() => None,
        end = tokio::time::timeout(DRAIN_TIMEOUT, rest) => end.ok(),
    }
}

/// What a reader draws on before allocating a frame, and how long it may take to fill it.
#[derive(Clone, Copy)]
struct Budgets<'a> {
    shared: &'a Semaphore,
    peer: &'a Arc<Semaphore>,
    read_timeout: Duration,
}

async fn read_loop<R>(
    reader: &mut R,
    peer: PeerId,
    class: &PeerClass,
    kind: StreamKind,
    frames: &mpsc::Sender<Delivery>,
    budgets: Budgets<'_>,
    counters: &Counters,
) -> StreamEnd
where
    R: AsyncRead + Unpin,
{
    loop {
        let len = match frame::read_header(reader, kind.max_frame()).await {
            Ok(Some(len)) => len,
            Ok(None) => return StreamEnd::RemoteClosed,
            Err(e) => {
                if matches!(e, Error::FrameTooLarge { .. }) {
                    bump(&counters.oversized_frames, 1);
                }
                return classify(e);
            }
        };
        // len <= MAX_FRAME_SIZE, far below u32::MAX, so the conversion cannot fail.
        let permits = u32::try_from(len).unwrap_or(u32::MAX);
        // The peer's own share first, so a peer at its cap waits without holding any of
        // the shared budget. Neither semaphore is ever closed; an error would mean the
        // node is gone. The EventStream returns both when it yields the frame.
        match budgets.peer.acquire_many(permits).await {
            Ok(permit) => permit.forget(),
            Err(_) => return StreamEnd::EventsClosed,
        }
        match budgets.shared.acquire_many(permits).await {
            Ok(permit) => permit.forget(),
            Err(_) => {
                budgets.peer.add_permits(len);
                return StreamEnd::EventsClosed;
            }
        }
        // Only the body's arrival is timed, not the waits above: those are the node
        // pushing back, not the peer dawdling. Without the bound, a peer trickling a
        // large frame would hold its reservation for as long as it liked.
        let body = tokio::time::timeout(budgets.read_timeout, frame::read_body(reader, len)).await;
        let body = match body {
            Ok(Ok(body)) => body,
            failed => {
                budgets.shared.add_permits(len);
                budgets.peer.add_permits(len);
                return match failed {
                    Ok(Err(e)) => classify(e),
                    _ => StreamEnd::ReadTimeout(budgets.read_timeout),
                };
            }
        };
        bump(&counters.frames_received, 1);
        bump(&counters.bytes_received, len as u64);
        let delivery = Delivery {
            event: kind.event(peer, class.clone(), Bytes::from(body)),
            peer_budget: budgets.peer.clone(),
        };
        if frames.send(delivery).await.is_err() {
            return StreamEnd::EventsClosed;
        }
    }
}

async fn write_loop<W>(
    writer: &mut W,
    outbox: &mut OutboxRx,
    counters: &Counters,
    drain: &CancellationToken,
) -> StreamEnd
where
    W: AsyncWrite + Unpin,
{
    loop {
        let next = tokio::select! {
            biased;
            () = drain.cancelled() => None,
            frame = outbox.next() => Some(frame),
        };
        let first = match next {
            None => {
                let _ = writer.close().await;
                return StreamEnd::Drained;
            }
            Some(None) => {
                let _ = writer.close().await;
                return StreamEnd::OutboxClosed;
            }
            Some(Some(frame)) => frame,
        };
        let mut next = Some(first);
        let mut written = 0;
        // Drain what is already queued before flushing: one flush per burst keeps
        // small frames from each costing a packet.
        while let Some(payload) = next.take() {
            if let Err(e) = frame::write_frame(writer, &payload).await {
                // The stream broke under this frame; keep it for the next stream.
                outbox.front = Some(payload);
                return classify(e);
            }
            outbox
                .queued_bytes
                .fetch_sub(payload.len(), Ordering::AcqRel);
            bump(&counters.frames_sent, 1);
            written += 1;
            if written < FRAMES_PER_FLUSH && !drain.is_cancelled() {
                next = outbox.try_next();
            }
        }
        if let Err(e) = writer.flush().await {
            return StreamEnd::Io(e.to_string());
        }
    }
}

/// Framing violations close the stream as malformed; anything else is the link failing.
fn classify(error: Error) -> StreamEnd {
    match error {
        Error::FrameTooLarge { .. } | Error::TruncatedFrame { .. } => {
            StreamEnd::Malformed(error.to_string())
        }
        other => StreamEnd::Io(other.to_string()),
    }
}

/// Opens an outbound stream, bounded in time.
pub(crate) async fn open(
    mut control: libp2p_stream::Control,
    peer: PeerId,
    kind: StreamKind,
) -> Result<libp2p::Stream, String> {
    match tokio::time::timeout(
        STREAM_OPEN_TIMEOUT,
        control.open_stream(peer, kind.protocol()),
    )
    .await
    {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "opening the {} stream took longer than {STREAM_OPEN_TIMEOUT:?}",
            kind.name()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_refuses_past_the_frame_cap_without_growing() {
        let (outbox, _rx) = Outbox::new(StreamKind::Ephemeral);
        for _ in 0..EPHEMERAL_QUEUE_FRAMES {
            outbox.push(Bytes::from_static(b"x")).unwrap();
        }
        assert_eq!(
            outbox.push(Bytes::from_static(b"x")),
            Err(PushError::Full {
                frames: EPHEMERAL_QUEUE_FRAMES,
                bytes: EPHEMERAL_QUEUE_FRAMES
            })
        );
        assert_eq!(
            outbox.queued(),
            (EPHEMERAL_QUEUE_FRAMES, EPHEMERAL_QUEUE_FRAMES)
        );
    }

    #[test]
    fn outbox_refuses_past_the_byte_cap() {
        let (outbox, _rx) = Outbox::new(StreamKind::Sync);
        const CHUNK: usize = 1024 * 1024;
        const _: () = assert!(SYNC_QUEUE_BYTES.is_multiple_of(CHUNK));
        let big = Bytes::from(vec![0u8; CHUNK]);
        for _ in 0..SYNC_QUEUE_BYTES / CHUNK {
            outbox.push(big.clone()).unwrap();
        }
        let err = outbox
            .push(Bytes::from_static(b"one more byte"))
            .unwrap_err();
        assert_eq!(
            err,
            PushError::Full {
                frames: SYNC_QUEUE_BYTES / CHUNK,
                bytes: SYNC_QUEUE_BYTES
            }
        );
        // The refused push must not leave its bytes counted.
        assert_eq!(outbox.queued().1, SYNC_QUEUE_BYTES);
    }

    #[tokio::test]
    async fn draining_frees_room_and_closing_is_reported() {
        let (outbox, mut rx) = Outbox::new(StreamKind::Sync);
        outbox.push(Bytes::from_static(b"abc")).unwrap();
        assert_eq!(outbox.queued(), (1, 3));
        let mut sink = futures::io::Cursor::new(Vec::new());
        let counters = Counters::default();
        drop(outbox);
        // The writer drains what was queued, then sees the queue closed.
        let end = write_loop(&mut sink, &mut rx, &counters, &CancellationToken::new()).await;
        assert!(matches!(end, StreamEnd::OutboxClosed));
        assert_eq!(sink.into_inner(), vec![0, 0, 0, 3, b'a', b'b', b'c']);
        assert_eq!(rx.queued_bytes.load(Ordering::Acquire), 0);
        assert_eq!(counters.snapshot().frames_sent, 1);

        let (outbox, rx) = Outbox::new(StreamKind::Sync);
        drop(rx);
        assert_eq!(
            outbox.push(Bytes::from_static(b"x")),
            Err(PushError::Closed)
        );
    }

    #[tokio::test]
    async fn a_frame_whose_write_failed_goes_first_on_the_next_stream() {
        let (outbox, mut rx) = Outbox::new(StreamKind::Sync);
        outbox.push(Bytes::from_static(b"second")).unwrap();
        // As left by a writer whose stream broke under "first": still counted as queued.
        rx.front = Some(Bytes::from_static(b"first"));
        rx.queued_bytes.fetch_add(5, Ordering::AcqRel);
        drop(outbox);
        let mut sink = futures::io::Cursor::new(Vec::new());
        let counters = Counters::default();
        let end = write_loop(&mut sink, &mut rx, &counters, &CancellationToken::new()).await;
        assert!(matches!(end, StreamEnd::OutboxClosed));
        let mut expected = 5u32.to_be_bytes().to_vec();
        expected.extend_from_slice(b"first");
        expected.extend_from_slice(&6u32.to_be_bytes());
        expected.extend_from_slice(b"second");
        assert_eq!(sink.into_inner(), expected);
        assert_eq!(rx.queued_bytes.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn draining_stops_at_a_frame_boundary_and_keeps_the_rest_queued() {
        let (outbox, mut rx) = Outbox::new(StreamKind::Sync);
        outbox.push(Bytes::from_static(b"kept")).unwrap();
        let drain = CancellationToken::new();
        drain.cancel();
        let mut sink = futures::io::Cursor::new(Vec::new());
        let end = write_loop(&mut sink, &mut rx, &Counters::default(), &drain).await;
        assert!(matches!(end, StreamEnd::Drained));
        assert!(
            sink.into_inner().is_empty(),
            "nothing written after the drain request"
        );
        // The queued frame is still there for the stream that takes over.
        assert_eq!(rx.try_next(), Some(Bytes::from_static(b"kept")));
        assert_eq!(outbox.queued(), (0, 4));
    }

    /// Budgets as a stream task gets them, with one peer's share of `per_peer` bytes.
    fn budgets(per_peer: usize) -> (Semaphore, Arc<Semaphore>) {
        (
            Semaphore::new(INBOUND_BUFFER_BYTES),
            Arc::new(Semaphore::new(per_peer)),
        )
    }

    #[tokio::test]
    async fn reader_delivers_frames_and_classifies_garbage() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&2u32.to_be_bytes());
        wire.extend_from_slice(b"hi");
        wire.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        let (tx, mut rx) = mpsc::channel(4);
        let (shared, peer_budget) = budgets(MAX_FRAME_SIZE);
        let budgets = Budgets {
            shared: &shared,
            peer: &peer_budget,
            read_timeout: Duration::from_secs(10),
        };
        let counters = Counters::default();
        let peer = PeerId::random();
        let mut reader = futures::io::Cursor::new(wire);
        let end = read_loop(
            &mut reader,
            peer,
            &PeerClass::Own,
            StreamKind::Sync,
            &tx,
            budgets,
            &counters,
        )
        .await;
        assert!(
            matches!(end, StreamEnd::Malformed(ref why) if why.contains("exceeds")),
            "{end:?}"
        );
        match rx.recv().await.map(|d| d.event) {
            Some(Event::Frame {
                peer: from, bytes, ..
            }) => {
                assert_eq!(from, peer);
                assert_eq!(&bytes[..], b"hi");
            }
            other => panic!("expected the good frame first, got {other:?}"),
        }
        // The good frame's bytes stay reserved until the EventStream hands it out, in
        // the shared budget and in the peer's share.
        assert_eq!(shared.available_permits(), INBOUND_BUFFER_BYTES - 2);
        assert_eq!(peer_budget.available_permits(), MAX_FRAME_SIZE - 2);
        assert_eq!(counters.snapshot().frames_received, 1);
        // The announced length was over the cap: counted as oversized, not only malformed.
        assert_eq!(counters.snapshot().oversized_frames, 1);
    }

    /// Serves `data`, then never another byte (and never wakes its reader).
    struct Stall {
        data: Vec<u8>,
        pos: usize,
    }

    impl AsyncRead for Stall {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            buf: &mut [u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let left = &self.data[self.pos..];
            if left.is_empty() {
                return std::task::Poll::Pending;
            }
            let n = left.len().min(buf.len());
            buf[..n].copy_from_slice(&left[..n]);
            self.pos += n;
            std::task::Poll::Ready(Ok(n))
        }
    }

    #[tokio::test]
    async fn a_frame_that_stops_arriving_times_out_and_gives_its_budget_back() {
        // A 1000-byte frame of which 10 bytes ever arrive.
        let mut data = 1000u32.to_be_bytes().to_vec();
        data.extend_from_slice(&[1; 10]);
        let mut reader = Stall { data, pos: 0 };
        let (tx, _rx) = mpsc::channel(4);
        let (shared, peer_budget) = budgets(MAX_FRAME_SIZE);
        let read_timeout = Duration::from_millis(50);
        let budgets = Budgets {
            shared: &shared,
            peer: &peer_budget,
            read_timeout,
        };
        let counters = Counters::default();
        let end = tokio::time::timeout(
            Duration::from_secs(10),
            read_loop(
                &mut reader,
                PeerId::random(),
                &PeerClass::Own,
                StreamKind::Sync,
                &tx,
                budgets,
                &counters,
            ),
        )
        .await
        .expect("the read timeout ends the loop");
        assert!(
            matches!(end, StreamEnd::ReadTimeout(t) if t == read_timeout),
            "{end:?}"
        );
        assert_eq!(shared.available_permits(), INBOUND_BUFFER_BYTES);
        assert_eq!(peer_budget.available_permits(), MAX_FRAME_SIZE);
    }

    #[tokio::test]
    async fn one_peer_cannot_hold_more_than_its_share() {
        // Three 600-byte frames against a 1000-byte share: the second waits for the
        // node to consume the first, while the shared budget still has plenty of room.
        let mut wire = Vec::new();
        for tag in 1..=3u8 {
            wire.extend_from_slice(&600u32.to_be_bytes());
            wire.extend_from_slice(&[tag; 600]);
        }
        let mut reader = futures::io::Cursor::new(wire);
        let (tx, mut rx) = mpsc::channel(8);
        let (shared, peer_budget) = budgets(1000);
        let counters = Counters::default();
        let reading = async {
            let budgets = Budgets {
                shared: &shared,
                peer: &peer_budget,
                read_timeout: Duration::from_secs(10),
            };
            read_loop(
                &mut reader,
                PeerId::random(),
                &PeerClass::Own,
                StreamKind::Sync,
                &tx,
                budgets,
                &counters,
            )
            .await
        };
        tokio::pin!(reading);
        let first = tokio::select! {
            end = &mut reading => panic!("reader ended early: {end:?}"),
            first = rx.recv() => first.expect("first frame"),
        };
        // Give the reader every chance to go on; it must be parked on the peer's share.
        for _ in 0..100 {
            tokio::select! {
                biased;
                end = &mut reading => panic!("reader ended early: {end:?}"),
                () = tokio::task::yield_now() => {}
            }
        }
        assert!(rx.try_recv().is_err(), "second frame read past the cap");
        assert_eq!(shared.available_permits(), INBOUND_BUFFER_BYTES - 600);
        // Consuming the first frame (as the EventStream does) lets the rest through.
        shared.add_permits(600);
        first.peer_budget.add_permits(600);
        let end = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                tokio::select! {
                    end = &mut reading => return end,
                    Some(d) = rx.recv() => {
                        if let Event::Frame { bytes, .. } = d.event {
                            shared.add_permits(bytes.len());
                            d.peer_budget.add_permits(bytes.len());
                        }
                    }
                }
            }
        })
        .await
        .expect("the reader finishes");
        assert!(matches!(end, StreamEnd::RemoteClosed), "{end:?}");
        assert_eq!(counters.snapshot().frames_received, 3);
    }
}
