//! `hearth invite`: asks the running node for a pairing code, prints it alone on stdout
//! and a QR code with instructions on stderr.

use std::time::Duration;

use anyhow::{Context, Result};

use super::{ClientArgs, client};

pub(super) fn invite(
    data: &std::path::Path,
    home: bool,
    ttl: Duration,
    c: &ClientArgs,
) -> Result<()> {
    let body = serde_json::json!({
        "kind": if home { "home" } else { "device" },
        "ttl_s": ttl.as_secs().max(1),
    });
    let reply: serde_json::Value = client(data, c)?.post("/api/invites", &body)?;
    let code = reply["code"]
        .as_str()
        .context("the node's reply has no code")?;
    if c.json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
    } else {
        println!("{code}");
    }
    if let Ok(qr) = qrcode::QrCode::new(code.as_bytes()) {
        let picture = qr
            .render::<qrcode::render::unicode::Dense1x2>()
            .quiet_zone(true)
            .build();
        eprintln!("{picture}");
    }
    eprintln!(
        "On the new device run:\n  hearth join <code> --data <DIR>\nthen `hearth up --data <DIR>`. \
         The code works once and expires at {}.",
        reply["expires_at"].as_str().unwrap_or("-")
    );
    Ok(())
}
