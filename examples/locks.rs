//! A queue-like task locks three devices at QUEUE_EXECUTING; maintenance preempts one of
//! them; the task sees the `lock.preempted` event and stops using that device. Headless,
//! loopback only, mDNS off, a temporary data dir; this node is its home's arbiter.
//!
//! ```text
//! cargo run --example locks
//! ```

use std::time::Duration;

use hearth::{Event, EventItem, LockAction, LockAsk, LockType, Node};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::builder()
        .data_dir(dir.path())
        .listen(["/ip4/127.0.0.1/tcp/0"])
        .mdns(false)
        .start()
        .await?;
    let locks = node.locks();
    let mut events = node.events();

    // The queue takes its plan's devices; each guard releases its lock when dropped.
    let mut held = Vec::new();
    for device in ["detector1", "motor1", "motor2"] {
        let mut ask = LockAsk::new(device, LockType::QueueExecuting, "queue_server");
        ask.plan_uid = Some("plan-42".into());
        ask.timeout = Duration::from_secs(600);
        let guard = locks.acquire(ask).await?;
        println!(
            "queue locked {} (token {})",
            device,
            guard.lock().fencing_token
        );
        held.push(guard);
    }

    // A technician needs motor1 now: maintenance outranks the running plan.
    let mut ask = LockAsk::new("motor1", LockType::Maintenance, "technician");
    ask.reason = Some("limit switch".into());
    let maintenance = locks.acquire(ask).await?;

    // The queue hears of it and lets motor1 go from its plan.
    while let Some(item) = events.next().await {
        if let EventItem::Event(Event::Lock {
            action: LockAction::Preempted,
            lock,
        }) = item
        {
            println!(
                "queue lost {} to maintenance; pausing its use in {}",
                lock.device_name,
                lock.plan_uid.as_deref().unwrap_or("its plan")
            );
            held.retain(|g| g.lock().device_name != lock.device_name);
            break;
        }
    }
    for guard in held {
        println!("queue releases {}", guard.lock().device_name);
        guard.release().await?;
    }
    maintenance.release().await?;
    println!("locks held now: {}", locks.status().await?.len());
    node.shutdown().await?;
    Ok(())
}
