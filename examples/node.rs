//! Starts a Hearth node through the library with its local API, prints its PeerId and the
//! API's address, and stops it.
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
    let node = hearth::Node::builder()
        .data_dir(&data)
        // Loopback only and no multicast: the example stays on this machine.
        .listen(["/ip4/127.0.0.1/tcp/0"])
        .mdns(false)
        // A node is headless unless asked for the API; port 0 picks a free one.
        .api("127.0.0.1:0".parse()?)
        .start()
        .await?;
    println!("PeerId:   {}", node.peer_id());
    if let Some(api) = node.api_addr() {
        println!("API:      http://{api}");
    }
    println!("data dir: {}", node.data_dir().display());
    node.shutdown().await?;
    std::fs::remove_dir_all(&data)?;
    Ok(())
}
