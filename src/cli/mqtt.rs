//! `hearth up`'s MQTT bridge settings: the `--mqtt*` flags and the `[mqtt]` section of the
//! config file, flags first.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// The `--mqtt*` flags of `hearth up`.
#[derive(Debug, Default, clap::Args)]
pub(super) struct MqttArgs {
    /// Bridge entities to Home Assistant through this MQTT broker, `mqtt://host:1883`.
    #[arg(long, value_name = "URL")]
    mqtt: Option<String>,

    /// The MQTT user name, if the broker asks for one.
    #[arg(long, value_name = "USER")]
    mqtt_user: Option<String>,

    /// A file holding the MQTT password (its first line), kept out of the command line.
    #[arg(long, value_name = "FILE")]
    mqtt_password_file: Option<PathBuf>,
}

/// The `[mqtt]` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct MqttSection {
    /// The broker, `mqtt://host:1883`; the bridge runs when it is set.
    url: Option<String>,
    user: Option<String>,
    password_file: Option<PathBuf>,
    /// Home Assistant's discovery prefix (default `homeassistant`).
    discovery_prefix: Option<String>,
    /// The node id in the topics (default: `hearth_` and the end of the PeerId).
    node_id: Option<String>,
    /// Entity id patterns to export (default `["*"]`).
    export: Option<Vec<String>>,
    /// Import what Home Assistant's mqtt_statestream publishes under this base topic.
    import_prefix: Option<String>,
    /// Most entities imported (default 1000).
    max_imported: Option<usize>,
}

/// The first line of a password file. A relative path is read from the config file's
/// folder when it came from the file.
fn read_password(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the MQTT password file {}", path.display()))?;
    let password = text.lines().next().unwrap_or_default().to_string();
    if password.is_empty() {
        bail!(
            "the MQTT password file {} is empty; put the password on its first line",
            path.display()
        );
    }
    Ok(password)
}

/// Flags over the file: the bridge's settings, or `None` when no broker is named.
pub(super) fn resolve(
    flags: MqttArgs,
    file: MqttSection,
    file_dir: &Path,
) -> Result<Option<hearth::MqttConfig>> {
    let Some(url) = flags.mqtt.or(file.url) else {
        if flags.mqtt_user.is_some() || flags.mqtt_password_file.is_some() {
            bail!("--mqtt-user and --mqtt-password-file need --mqtt URL (or mqtt.url)");
        }
        return Ok(None);
    };
    let mut config = hearth::MqttConfig::new(url);
    config.user = flags.mqtt_user.or(file.user);
    let password_file = flags
        .mqtt_password_file
        .or_else(|| file.password_file.map(|p| file_dir.join(p)));
    config.password = password_file.as_deref().map(read_password).transpose()?;
    if let Some(prefix) = file.discovery_prefix {
        config.discovery_prefix = prefix;
    }
    config.node_id = file.node_id;
    if let Some(export) = file.export {
        config.export = export;
    }
    config.import_prefix = file.import_prefix;
    if let Some(n) = file.max_imported {
        config.max_imported = n;
    }
    Ok(Some(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_section_and_the_password_comes_from_its_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "s3cret\n").unwrap();
        let file: MqttSection = toml_section(
            r#"url = "mqtt://file:1883"
user = "ha"
password_file = "pw"
discovery_prefix = "ha"
node_id = "house"
export = ["light.*"]
import_prefix = "statestream"
max_imported = 5"#,
        );
        let config = resolve(MqttArgs::default(), file, dir.path())
            .unwrap()
            .unwrap();
        assert_eq!(config.url, "mqtt://file:1883");
        assert_eq!(config.user.as_deref(), Some("ha"));
        assert_eq!(config.password.as_deref(), Some("s3cret"));
        assert_eq!(config.discovery_prefix, "ha");
        assert_eq!(config.node_id.as_deref(), Some("house"));
        assert_eq!(config.export, vec!["light.*".to_string()]);
        assert_eq!(config.import_prefix.as_deref(), Some("statestream"));
        assert_eq!(config.max_imported, 5);
        let flags = MqttArgs {
            mqtt: Some("mqtt://flag:1884".into()),
            mqtt_user: Some("me".into()),
            mqtt_password_file: None,
        };
        let config = resolve(flags, MqttSection::default(), dir.path())
            .unwrap()
            .unwrap();
        assert_eq!(config.url, "mqtt://flag:1884");
        assert_eq!(config.password, None);
        assert!(
            resolve(MqttArgs::default(), MqttSection::default(), dir.path())
                .unwrap()
                .is_none()
        );
        let lonely = MqttArgs {
            mqtt_user: Some("me".into()),
            ..MqttArgs::default()
        };
        assert!(resolve(lonely, MqttSection::default(), dir.path()).is_err());
        std::fs::write(dir.path().join("empty"), "").unwrap();
        let empty = MqttArgs {
            mqtt: Some("mqtt://h".into()),
            mqtt_user: Some("me".into()),
            mqtt_password_file: Some(dir.path().join("empty")),
        };
        assert!(resolve(empty, MqttSection::default(), dir.path()).is_err());
    }

    fn toml_section(text: &str) -> MqttSection {
        use figment::providers::{Format, Toml};
        figment::Figment::new()
            .merge(Toml::string(text))
            .extract()
            .unwrap()
    }
}
