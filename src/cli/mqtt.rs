//! `hearth up`'s MQTT bridge settings: the `--mqtt*` flags and the `[mqtt]` section, one
//! layer of [`super::config`]'s settings each (`HEARTH_MQTT__<KEY>` in the environment).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

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

/// The `[mqtt]` section, as each layer writes it.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct MqttSection {
    /// The broker, `mqtt://host:1883`; the bridge runs when it is set.
    #[serde(deserialize_with = "super::config::text::one")]
    url: Option<String>,
    #[serde(deserialize_with = "super::config::text::one")]
    user: Option<String>,
    /// The password's file (its first line); relative to the config file's folder when
    /// the file names it.
    password_file: Option<PathBuf>,
    /// Home Assistant's discovery prefix (default `homeassistant`).
    #[serde(deserialize_with = "super::config::text::one")]
    discovery_prefix: Option<String>,
    /// The node id in the topics (default: `hearth_` and the end of the PeerId).
    #[serde(deserialize_with = "super::config::text::one")]
    node_id: Option<String>,
    /// Entity id patterns to export (default `["*"]`).
    #[serde(deserialize_with = "super::config::text::list")]
    export: Option<Vec<String>>,
    /// Import what Home Assistant's mqtt_statestream publishes under this base topic.
    #[serde(deserialize_with = "super::config::text::one")]
    import_prefix: Option<String>,
    /// Most entities imported (default 1000).
    max_imported: Option<usize>,
}

impl MqttSection {
    /// The defaults layer's section: the bridge's defaults, and no broker.
    pub(super) fn defaults() -> Self {
        let bridge = hearth::MqttConfig::new("");
        MqttSection {
            discovery_prefix: Some(bridge.discovery_prefix),
            export: Some(bridge.export),
            max_imported: Some(bridge.max_imported),
            ..MqttSection::default()
        }
    }

    /// The flags layer's section: the `--mqtt*` flags that were given.
    pub(super) fn flags(flags: &MqttArgs) -> Self {
        MqttSection {
            url: flags.mqtt.clone(),
            user: flags.mqtt_user.clone(),
            password_file: flags.mqtt_password_file.clone(),
            ..MqttSection::default()
        }
    }

    /// The merged section as the bridge's settings, or `None` when no broker is named.
    /// A relative `password_file` is read from `password_dir` when given.
    pub(super) fn settle(&self, password_dir: Option<&Path>) -> Result<Option<hearth::MqttConfig>> {
        let Some(url) = self.url.clone() else {
            if self.user.is_some() || self.password_file.is_some() {
                bail!(
                    "mqtt.user and mqtt.password_file (--mqtt-user, --mqtt-password-file) \
                     need mqtt.url (--mqtt URL)"
                );
            }
            return Ok(None);
        };
        let mut config = hearth::MqttConfig::new(url);
        config.user = self.user.clone();
        config.password = match &self.password_file {
            Some(file) => Some(read_password(
                &password_dir.map_or_else(|| file.clone(), |dir| dir.join(file)),
            )?),
            None => None,
        };
        if let Some(prefix) = &self.discovery_prefix {
            config.discovery_prefix = prefix.clone();
        }
        config.node_id = self.node_id.clone();
        if let Some(export) = &self.export {
            config.export = export.clone();
        }
        config.import_prefix = self.import_prefix.clone();
        if let Some(n) = self.max_imported {
            config.max_imported = n;
        }
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("[mqtt]: {e}"))?;
        Ok(Some(config))
    }
}

/// The first line of a password file.
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

/// The bridge's settings for `config check --json`, the password only as `<set>`.
pub(super) fn summary(m: &hearth::MqttConfig) -> serde_json::Value {
    serde_json::json!({
        "url": m.url, "user": m.user, "password": m.password.as_ref().map(|_| "<set>"),
        "discovery_prefix": m.discovery_prefix, "node_id": m.node_id, "export": m.export,
        "import_prefix": m.import_prefix, "max_imported": m.max_imported,
    })
}

/// One line on the bridge for `config check`, the password only as `<set>`.
pub(super) fn describe(m: Option<&hearth::MqttConfig>) -> String {
    let Some(m) = m else {
        return "the MQTT bridge is off (no mqtt.url)".to_string();
    };
    let login = match (&m.user, &m.password) {
        (Some(user), Some(_)) => format!("as {user} (password <set>)"),
        (Some(user), None) => format!("as {user} (no password)"),
        (None, _) => "without a user".to_string(),
    };
    let import = match &m.import_prefix {
        Some(prefix) => format!("importing under {prefix}"),
        None => "importing nothing".to_string(),
    };
    format!(
        "the MQTT bridge connects to {} {login}, discovery under {}, {import}",
        m.url, m.discovery_prefix
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(text: &str) -> MqttSection {
        use figment::providers::{Format, Toml};
        #[derive(Deserialize)]
        struct File {
            mqtt: MqttSection,
        }
        figment::Figment::new()
            .merge(Toml::string(text))
            .extract::<File>()
            .unwrap()
            .mqtt
    }

    #[test]
    fn the_section_becomes_the_bridges_settings_with_the_password_from_its_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "s3cret\nignored\n").unwrap();
        let full = section(
            r#"[mqtt]
url = "mqtt://file:1883"
user = "ha"
password_file = "pw"
discovery_prefix = "ha"
node_id = "house"
export = ["light.*"]
import_prefix = "statestream"
max_imported = 5"#,
        );
        let config = full.settle(Some(dir.path())).unwrap().unwrap();
        assert_eq!(config.url, "mqtt://file:1883");
        assert_eq!(config.user.as_deref(), Some("ha"));
        assert_eq!(config.password.as_deref(), Some("s3cret"));
        assert_eq!(config.discovery_prefix, "ha");
        assert_eq!(config.node_id.as_deref(), Some("house"));
        assert_eq!(config.export, vec!["light.*".to_string()]);
        assert_eq!(config.import_prefix.as_deref(), Some("statestream"));
        assert_eq!(config.max_imported, 5);
        let line = describe(Some(&config));
        assert!(line.contains("password <set>"), "{line}");
        assert!(!line.contains("s3cret"), "{line}");
        assert_eq!(summary(&config)["password"], "<set>");
        // Relative to the working dir when no folder is given: not found here.
        let error = full.settle(None).unwrap_err().to_string();
        assert!(
            error.contains("cannot read the MQTT password file pw"),
            "{error}"
        );

        // The defaults alone: no bridge.
        assert!(MqttSection::defaults().settle(None).unwrap().is_none());
        assert_eq!(
            describe(None),
            "the MQTT bridge is off (no mqtt.url)".to_string()
        );
        // A user without a broker, an empty password file and a TLS URL are refused.
        let lonely = MqttSection::flags(&MqttArgs {
            mqtt_user: Some("me".into()),
            ..MqttArgs::default()
        });
        let error = lonely.settle(None).unwrap_err().to_string();
        assert!(error.contains("need mqtt.url"), "{error}");
        std::fs::write(dir.path().join("empty"), "").unwrap();
        let empty = MqttSection::flags(&MqttArgs {
            mqtt: Some("mqtt://h".into()),
            mqtt_user: Some("me".into()),
            mqtt_password_file: Some(dir.path().join("empty")),
        });
        let error = empty.settle(None).unwrap_err().to_string();
        assert!(error.contains("is empty"), "{error}");
        let tls = section("[mqtt]\nurl = \"mqtts://broker:8883\"\n");
        let error = tls.settle(None).unwrap_err().to_string();
        assert!(error.contains("TLS is not supported"), "{error}");
    }
}
