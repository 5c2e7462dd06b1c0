//! The same hello, admission and frames over QUIC (built with `--features quic`).

use anyhow::Result;
use hearth_net::{Bytes, DeviceIdentity, SendOutcome};
use tokio::time::timeout;

use crate::util::{SOON, config, init_tracing, spawn_auto, wait_ready};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_flow_over_quic() -> Result<()> {
    init_tracing();
    let quic = |identity| hearth_net::Config {
        listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()],
        ..config(identity)
    };
    let (a, mut a_events) = spawn_auto(quic(DeviceIdentity::generate())).await?;
    let (b, mut b_events) = spawn_auto(quic(DeviceIdentity::generate())).await?;
    assert!(a.addr.to_string().contains("/quic-v1/"), "{}", a.addr);
    timeout(SOON, b.handle.add_static_peer(a.addr.clone())).await??;
    wait_ready(&a, b.peer).await?;
    wait_ready(&b, a.peer).await?;
    for i in 0..20u8 {
        let out = timeout(SOON, a.handle.send(b.peer, Bytes::from(vec![i; 100]))).await??;
        assert_eq!(out, SendOutcome::Queued);
        let out = timeout(SOON, b.handle.send(a.peer, Bytes::from(vec![i; 50]))).await??;
        assert_eq!(out, SendOutcome::Queued);
    }
    let at_b = b_events.frames_from(a.peer, 20).await?;
    let at_a = a_events.frames_from(b.peer, 20).await?;
    assert_eq!(at_b[19], vec![19u8; 100]);
    assert_eq!(at_a[19], vec![19u8; 50]);
    a.stop().await?;
    b.stop().await?;
    Ok(())
}
