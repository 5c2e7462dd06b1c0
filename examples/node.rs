//! Starts a Hearth node through the library, prints its PeerId, and stops it.
//!
//! ```text
//! cargo run --example node
//! ```
//!
//! The node uses a temporary data dir and a free API port, so it does not disturb a node
//! you already run.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let data = std::env::temp_dir().join(format!("hearth-example-{}", std::process::id()));
    let config = hearth::Config {
        data_dir: data.clone(),
        api_addr: "127.0.0.1:0".parse()?,
        // Loopback only and no multicast: the example stays on this machine.
        listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
        mdns: false,
        ..hearth::Config::default()
    };
    let node = hearth::Node::start(config).await?;
    println!("PeerId:   {}", node.peer_id());
    println!("API:      http://{}", node.api_addr());
    println!("data dir: {}", node.data_dir().display());
    node.shutdown().await?;
    std::fs::remove_dir_all(&data)?;
    Ok(())
}
