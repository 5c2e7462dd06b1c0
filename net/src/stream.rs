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
use crate::event::{Counters, Event, bump};
use crate::frame;

/// Largest sync frame, checked by the sender and by the receiver before allocating.
pub const MAX_FRAME_SIZE: usize = 4 * 1024 * 1024;

/// Largest ephemeral frame; presence beats and clock probes are small.
pub const MAX_EPHEMERAL_FRAME_SIZE: usize = 64 * 1024;

/// Frames that may wait in one peer's outbound sync queue.
pub const SYNC_QUEUE_FRAMES: usize = 4096;

/// Bytes that may wait in one peer's outbound sync queue. Filling either cap marks the
/// peer slow; the byte cap is what actually bounds memory when frames are large.
pub const SYNC_QUEUE_BYTES: usize = 16 * 1024 * 1024;

/// Frames that may wait in one peer's outbound ephemeral queue.
pub const EPHEMERAL_QUEUE_FRAMES: usize = 256;

/// Bytes that may wait in one peer's outbound ephemeral queue.
pub const EPHEMERAL_QUEUE_BYTES: usize = 1024 * 1024;

/// Received frame bytes held for the consumer across all peers. A reader reserves a
/// frame's length here before allocating it, so a consumer that stops reading stalls the
/// readers (and, through Yamux flow control, the senders) instead of growing memory.
pub(crate) const INBOUND_BUFFER_BYTES: usize = 64 * 1024 * 1024;

// The largest frame must fit the budget, or its reader would wait forever.
const _: () = assert!(INBOUND_BUFFER_BYTES >= MAX_FRAME_SIZE);
const _: () = assert!(SYNC_QUEUE_BYTES >= MAX_FRAME_SIZE);
const _: () = assert!(EPHEMERAL_QUEUE_BYTES >= MAX_EPHEMERAL_FRAME_SIZE);

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

    fn event(self, peer: PeerId, bytes: Bytes) -> Event {
        match self {
            Self::Sync => Event::Frame { peer, bytes },
            Self::Ephemeral => Event::EphemeralFrame { peer, bytes },
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
            OutboxRx { rx, queued_bytes },
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

/// How a stream task ended.
#[derive(Debug)]
pub(crate) enum StreamEnd {
    /// The event loop cancelled it (disconnect, replacement, shutdown).
    Cancelled,
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
}

/// Everything a stream task needs; built by the event loop.
pub(crate) struct StreamTask {
    pub(crate) peer: PeerId,
    pub(crate) kind: StreamKind,
    pub(crate) stream: libp2p::Stream,
    pub(crate) outbox: OutboxRx,
    pub(crate) frames: mpsc::Sender<Event>,
    pub(crate) budget: Arc<Semaphore>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) cancel: CancellationToken,
}

impl StreamTask {
    /// Pumps the stream until it ends; hands the queue back so a replacement stream can
    /// carry on with the frames still waiting.
    pub(crate) async fn run(self) -> (OutboxRx, StreamEnd) {
        let Self {
            peer,
            kind,
            stream,
            mut outbox,
            frames,
            budget,
            counters,
            cancel,
        } = self;
        let (read_half, write_half) = stream.split();
        let mut reader = BufReader::with_capacity(IO_BUFFER, read_half);
        let mut writer = BufWriter::with_capacity(IO_BUFFER, write_half);
        // Reading and writing run as two whole loops raced against each other, not as
        // per-frame select arms, so neither is ever cancelled halfway through a frame
        // except when the whole stream is being torn down.
        let end = tokio::select! {
            () = cancel.cancelled() => StreamEnd::Cancelled,
            end = read_loop(&mut reader, peer, kind, &frames, &budget, &counters) => end,
            end = write_loop(&mut writer, &mut outbox, &counters) => end,
        };
        if matches!(end, StreamEnd::Malformed(_)) {
            bump(&counters.malformed_frames, 1);
        }
        (outbox, end)
    }
}

async fn read_loop<R>(
    reader: &mut R,
    peer: PeerId,
    kind: StreamKind,
    frames: &mpsc::Sender<Event>,
    budget: &Semaphore,
    counters: &Counters,
) -> StreamEnd
where
    R: AsyncRead + Unpin,
{
    loop {
        let len = match frame::read_header(reader, kind.max_frame()).await {
            Ok(Some(len)) => len,
            Ok(None) => return StreamEnd::RemoteClosed,
            Err(e) => return classify(e),
        };
        // len <= MAX_FRAME_SIZE, far below u32::MAX, so the conversion cannot fail.
        let permits = u32::try_from(len).unwrap_or(u32::MAX);
        match budget.acquire_many(permits).await {
            // The EventStream returns these permits when it yields the frame.
            Ok(permit) => permit.forget(),
            Err(_) => return StreamEnd::EventsClosed,
        }
        let body = match frame::read_body(reader, len).await {
            Ok(body) => body,
            Err(e) => {
                budget.add_permits(len);
                return classify(e);
            }
        };
        bump(&counters.frames_received, 1);
        bump(&counters.bytes_received, len as u64);
        if frames
            .send(kind.event(peer, Bytes::from(body)))
            .await
            .is_err()
        {
            return StreamEnd::EventsClosed;
        }
    }
}

async fn write_loop<W>(writer: &mut W, outbox: &mut OutboxRx, counters: &Counters) -> StreamEnd
where
    W: AsyncWrite + Unpin,
{
    loop {
        let Some(first) = outbox.rx.recv().await else {
            return StreamEnd::OutboxClosed;
        };
        let mut next = Some(first);
        let mut written = 0;
        // Drain what is already queued before flushing: one flush per burst keeps
        // small frames from each costing a packet.
        while let Some(payload) = next.take() {
            if let Err(e) = frame::write_frame(writer, &payload).await {
                return classify(e);
            }
            outbox
                .queued_bytes
                .fetch_sub(payload.len(), Ordering::AcqRel);
            bump(&counters.frames_sent, 1);
            written += 1;
            if written < FRAMES_PER_FLUSH {
                next = outbox.rx.try_recv().ok();
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
        let big = Bytes::from(vec![0u8; MAX_FRAME_SIZE]);
        for _ in 0..SYNC_QUEUE_BYTES / MAX_FRAME_SIZE {
            outbox.push(big.clone()).unwrap();
        }
        let err = outbox
            .push(Bytes::from_static(b"one more byte"))
            .unwrap_err();
        assert_eq!(
            err,
            PushError::Full {
                frames: SYNC_QUEUE_BYTES / MAX_FRAME_SIZE,
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
        let end = write_loop(&mut sink, &mut rx, &counters).await;
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
    async fn reader_delivers_frames_and_classifies_garbage() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&2u32.to_be_bytes());
        wire.extend_from_slice(b"hi");
        wire.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        let (tx, mut rx) = mpsc::channel(4);
        let budget = Semaphore::new(INBOUND_BUFFER_BYTES);
        let counters = Counters::default();
        let peer = PeerId::random();
        let mut reader = futures::io::Cursor::new(wire);
        let end = read_loop(&mut reader, peer, StreamKind::Sync, &tx, &budget, &counters).await;
        assert!(
            matches!(end, StreamEnd::Malformed(ref why) if why.contains("exceeds")),
            "{end:?}"
        );
        match rx.recv().await {
            Some(Event::Frame { peer: from, bytes }) => {
                assert_eq!(from, peer);
                assert_eq!(&bytes[..], b"hi");
            }
            other => panic!("expected the good frame first, got {other:?}"),
        }
        // The good frame's bytes stay reserved until the EventStream hands it out.
        assert_eq!(budget.available_permits(), INBOUND_BUFFER_BYTES - 2);
        assert_eq!(counters.snapshot().frames_received, 1);
    }
}
