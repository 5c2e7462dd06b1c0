//! Home Assistant's side of the bridge as plain functions: which MQTT component an entity
//! becomes, its discovery config, what its state topics carry, and what a command payload
//! writes. No IO here, so all of it is unit tested.

use serde_json::{Map, Value, json};

use crate::Entity;

/// The MQTT components the bridge exports, named as Home Assistant names them; an entity
/// whose id's domain is one of these is exported as that component.
pub const COMPONENTS: [&str; 6] = [
    "light",
    "switch",
    "sensor",
    "binary_sensor",
    "climate",
    "cover",
];

/// The climate modes offered when the entity names none in `hvac_modes`.
const DEFAULT_HVAC_MODES: [&str; 6] = ["off", "heat", "cool", "auto", "heat_cool", "dry"];

/// The component for an entity id (`light.porch` -> `light`), or `None` for a domain Home
/// Assistant's MQTT discovery has no mapping for here.
pub(crate) fn component(entity_id: &str) -> Option<&'static str> {
    let domain = entity_id.split_once('.')?.0;
    COMPONENTS.iter().copied().find(|c| *c == domain)
}

/// Where the bridge puts one node's topics: `<base>/<node_id>/...`.
#[derive(Clone, Debug)]
pub(crate) struct Topics {
    /// `hearth/<node_id>`.
    pub(crate) base: String,
    /// The discovery prefix, `homeassistant` by default.
    pub(crate) discovery: String,
    /// The node id in discovery topics and unique ids.
    pub(crate) node_id: String,
}

impl Topics {
    pub(crate) fn new(discovery: &str, node_id: &str) -> Self {
        Self {
            base: format!("{}/{node_id}", super::TOPIC_ROOT),
            discovery: discovery.to_string(),
            node_id: node_id.to_string(),
        }
    }

    /// The node's availability (last will) topic.
    pub(crate) fn availability(&self) -> String {
        format!("{}/availability", self.base)
    }

    /// `hearth/<node_id>/<domain>/<object>`: the `~` of the entity's discovery config.
    pub(crate) fn entity_base(&self, entity_id: &str) -> String {
        let (domain, object) = entity_id.split_once('.').unwrap_or((entity_id, ""));
        format!("{}/{domain}/{object}", self.base)
    }

    pub(crate) fn config(&self, entity_id: &str) -> Option<String> {
        let component = component(entity_id)?;
        let object = entity_id.split_once('.')?.1;
        Some(format!(
            "{}/{component}/{}/{object}/config",
            self.discovery, self.node_id
        ))
    }

    pub(crate) fn state(&self, entity_id: &str) -> String {
        format!("{}/state", self.entity_base(entity_id))
    }

    pub(crate) fn attributes(&self, entity_id: &str) -> String {
        format!("{}/attributes", self.entity_base(entity_id))
    }

    /// The filter that catches every command topic of this node.
    pub(crate) fn command_filter(&self) -> String {
        format!("{}/+/+/set/#", self.base)
    }

    /// The filter that catches this node's discovery configs (retained ones left from an
    /// earlier run included).
    pub(crate) fn config_filter(&self) -> String {
        format!("{}/+/{}/+/config", self.discovery, self.node_id)
    }

    /// The entity id and the command's field (`None` for the main one, `Some("temperature")`
    /// for a climate set point) of a command topic, or `None` for any other topic.
    pub(crate) fn parse_command<'a>(&self, topic: &'a str) -> Option<(String, Option<&'a str>)> {
        let rest = topic.strip_prefix(&self.base)?.strip_prefix('/')?;
        let mut parts = rest.split('/');
        let domain = parts.next()?;
        let object = parts.next()?;
        if parts.next()? != "set" {
            return None;
        }
        let field = parts.next();
        if parts.next().is_some() {
            return None;
        }
        let id = format!("{domain}.{object}");
        crate::entities::validate_entity_id(&id).ok()?;
        Some((id, field))
    }

    /// The entity id of one of this node's discovery config topics.
    pub(crate) fn parse_config(&self, topic: &str) -> Option<String> {
        let rest = topic.strip_prefix(&self.discovery)?.strip_prefix('/')?;
        let mut parts = rest.split('/');
        let component = parts.next()?;
        if parts.next()? != self.node_id {
            return None;
        }
        let object = parts.next()?;
        (parts.next()? == "config" && parts.next().is_none())
            .then(|| format!("{component}.{object}"))
    }
}

/// The device block every discovery config carries, so Home Assistant groups the node's
/// entities under one device.
pub(crate) fn device(topics: &Topics, device_name: &str) -> Value {
    json!({
        "ids": [format!("hearth_{}", topics.node_id)],
        "name": format!("Hearth {device_name}"),
        "mf": "Hearth",
        "sw": env!("CARGO_PKG_VERSION"),
    })
}

/// The retained discovery config for `entity`: one line of JSON, with `~` standing for the
/// entity's topic base. `None` when its domain has no component.
pub(crate) fn discovery_config(topics: &Topics, device: &Value, entity: &Entity) -> Option<String> {
    let id = entity.id.as_str();
    let component = component(id)?;
    let object = id.split_once('.')?.1;
    let name = entity
        .attributes
        .get("friendly_name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty() && n.len() <= 255)
        .unwrap_or(object);
    let mut config = Map::new();
    config.insert("~".into(), topics.entity_base(id).into());
    config.insert("name".into(), name.into());
    config.insert(
        "unique_id".into(),
        format!("hearth_{}_{component}_{object}", topics.node_id).into(),
    );
    config.insert("default_entity_id".into(), id.into());
    config.insert("avty_t".into(), topics.availability().into());
    config.insert("json_attr_t".into(), "~/attributes".into());
    config.insert("dev".into(), device.clone());
    let copy = |config: &mut Map<String, Value>, attribute: &str, key: &str| {
        if let Some(v) = entity.attributes.get(attribute).and_then(Value::as_str) {
            config.insert(key.into(), v.into());
        }
    };
    match component {
        "light" | "switch" => {
            config.insert("stat_t".into(), "~/state".into());
            config.insert("cmd_t".into(), "~/set".into());
        }
        "binary_sensor" => {
            config.insert("stat_t".into(), "~/state".into());
            copy(&mut config, "device_class", "dev_cla");
        }
        "sensor" => {
            config.insert("stat_t".into(), "~/state".into());
            copy(&mut config, "device_class", "dev_cla");
            copy(&mut config, "unit_of_measurement", "unit_of_meas");
            copy(&mut config, "state_class", "stat_cla");
        }
        "cover" => {
            config.insert("stat_t".into(), "~/state".into());
            config.insert("cmd_t".into(), "~/set".into());
            copy(&mut config, "device_class", "dev_cla");
        }
        "climate" => {
            config.insert("mode_stat_t".into(), "~/state".into());
            config.insert("mode_cmd_t".into(), "~/set".into());
            config.insert("temp_cmd_t".into(), "~/set/temperature".into());
            config.insert("temp_stat_t".into(), "~/attributes".into());
            config.insert(
                "temp_stat_tpl".into(),
                "{{ value_json.temperature }}".into(),
            );
            config.insert("curr_temp_t".into(), "~/attributes".into());
            config.insert(
                "curr_temp_tpl".into(),
                "{{ value_json.current_temperature }}".into(),
            );
            config.insert("modes".into(), hvac_modes(entity).into());
        }
        _ => return None,
    }
    serde_json::to_string(&Value::Object(config)).ok()
}

fn hvac_modes(entity: &Entity) -> Vec<String> {
    let given: Vec<String> = entity
        .attributes
        .get("hvac_modes")
        .and_then(Value::as_array)
        .map(|modes| {
            modes
                .iter()
                .filter_map(Value::as_str)
                .filter(|m| valid_word(m))
                .take(16)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    if given.is_empty() {
        DEFAULT_HVAC_MODES.iter().map(|m| m.to_string()).collect()
    } else {
        given
    }
}

/// What the state topic carries: lights, switches and binary sensors `ON`/`OFF` (`None`,
/// Home Assistant's "unknown", for any other state); the rest their state as it is.
pub(crate) fn state_payload(entity: &Entity) -> String {
    match component(entity.id.as_str()) {
        Some("light" | "switch" | "binary_sensor") => match entity.state.as_str() {
            "on" => "ON".into(),
            "off" => "OFF".into(),
            _ => "None".into(),
        },
        _ => entity.state.clone(),
    }
}

/// The attributes topic's payload: the entity's attributes as one JSON object.
pub(crate) fn attributes_payload(entity: &Entity) -> String {
    serde_json::to_string(&entity.attributes).unwrap_or_else(|_| "{}".into())
}

/// What a command from Home Assistant asks of an entity.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Command {
    /// Write this state, keeping the attributes.
    State(String),
    /// Set one attribute (a climate's set point), keeping the state.
    Attribute(&'static str, Value),
}

/// Reads a command payload for `entity_id` (`field` is the part after `set/`), or says why
/// it is refused.
pub(crate) fn parse_command(
    entity_id: &str,
    field: Option<&str>,
    payload: &[u8],
) -> Result<Command, String> {
    let text = std::str::from_utf8(payload)
        .map_err(|_| "the payload is not UTF-8".to_string())?
        .trim();
    let component = component(entity_id).ok_or("not an exported component")?;
    match (component, field) {
        ("light" | "switch", None) => match text {
            "ON" => Ok(Command::State("on".into())),
            "OFF" => Ok(Command::State("off".into())),
            _ => Err(format!("{component} commands are ON or OFF, not {text:?}")),
        },
        ("cover", None) => match text {
            "OPEN" => Ok(Command::State("open".into())),
            "CLOSE" => Ok(Command::State("closed".into())),
            "STOP" => Ok(Command::State("stopped".into())),
            _ => Err(format!(
                "cover commands are OPEN, CLOSE or STOP, not {text:?}"
            )),
        },
        ("climate", None) if valid_word(text) => Ok(Command::State(text.into())),
        ("climate", None) => Err(format!("{text:?} is not a climate mode")),
        ("climate", Some("temperature")) => match text.parse::<f64>() {
            Ok(t) if t.is_finite() => Ok(Command::Attribute("temperature", json!(t))),
            _ => Err(format!("{text:?} is not a temperature")),
        },
        (_, Some(field)) => Err(format!("{component} has no command field {field:?}")),
        (_, None) => Err(format!("{component} takes no commands")),
    }
}

/// A short lowercase word such as a climate mode.
fn valid_word(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 32
        && text
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DeviceId, EntityId, HomeId, Timestamp};

    fn entity(id: &str, state: &str, attributes: Value) -> Entity {
        Entity {
            id: EntityId::from(id),
            state: state.into(),
            attributes: attributes.as_object().cloned().unwrap_or_default(),
            updated_at: Timestamp::now(),
            updated_by: DeviceId::from("12D3Koo"),
            owner: HomeId::from("home"),
            version: "00".into(),
        }
    }

    #[test]
    fn components_come_from_the_domain() {
        assert_eq!(component("light.porch"), Some("light"));
        assert_eq!(component("binary_sensor.door"), Some("binary_sensor"));
        assert_eq!(component("media_player.tv"), None);
        assert_eq!(component("light"), None);
    }

    #[test]
    fn a_light_has_one_line_discovery_with_its_topics_under_the_tilde() {
        let topics = Topics::new("homeassistant", "hearth_a");
        let device = device(&topics, "kitchen");
        let light = entity("light.porch", "on", json!({"friendly_name": "Porch"}));
        let text = discovery_config(&topics, &device, &light).unwrap();
        assert!(!text.contains('\n'));
        let config: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(config["~"], "hearth/hearth_a/light/porch");
        assert_eq!(config["name"], "Porch");
        assert_eq!(config["stat_t"], "~/state");
        assert_eq!(config["cmd_t"], "~/set");
        assert_eq!(config["json_attr_t"], "~/attributes");
        assert_eq!(config["avty_t"], "hearth/hearth_a/availability");
        assert_eq!(config["unique_id"], "hearth_hearth_a_light_porch");
        assert_eq!(config["default_entity_id"], "light.porch");
        assert_eq!(
            topics.config("light.porch").unwrap(),
            "homeassistant/light/hearth_a/porch/config"
        );
        assert_eq!(state_payload(&light), "ON");
        assert_eq!(
            state_payload(&entity("switch.fan", "off", json!({}))),
            "OFF"
        );
        assert_eq!(
            state_payload(&entity("switch.fan", "unavailable", json!({}))),
            "None"
        );
        assert_eq!(
            state_payload(&entity("sensor.temp", "21.5", json!({}))),
            "21.5"
        );
        // Unexported domains have no config.
        assert!(discovery_config(&topics, &device, &entity("lock.door", "x", json!({}))).is_none());
    }

    #[test]
    fn sensors_and_climates_carry_what_home_assistant_reads() {
        let topics = Topics::new("ha", "n1");
        let device = device(&topics, "d");
        let sensor = entity(
            "sensor.temp",
            "21",
            json!({"unit_of_measurement": "°C", "device_class": "temperature"}),
        );
        let config: Value =
            serde_json::from_str(&discovery_config(&topics, &device, &sensor).unwrap()).unwrap();
        assert_eq!(config["unit_of_meas"], "°C");
        assert_eq!(config["dev_cla"], "temperature");
        assert!(config.get("cmd_t").is_none());
        let climate = entity(
            "climate.hall",
            "heat",
            json!({"hvac_modes": ["off", "heat"]}),
        );
        let config: Value =
            serde_json::from_str(&discovery_config(&topics, &device, &climate).unwrap()).unwrap();
        assert_eq!(config["modes"], json!(["off", "heat"]));
        assert_eq!(config["temp_cmd_t"], "~/set/temperature");
    }

    #[test]
    fn commands_are_read_as_home_assistant_sends_them_and_the_rest_refused() {
        assert_eq!(
            parse_command("light.porch", None, b"ON"),
            Ok(Command::State("on".into()))
        );
        assert_eq!(
            parse_command("switch.fan", None, b"OFF"),
            Ok(Command::State("off".into()))
        );
        assert!(parse_command("light.porch", None, b"on please").is_err());
        assert!(parse_command("light.porch", None, &[0xff, 0xfe]).is_err());
        assert!(parse_command("sensor.temp", None, b"5").is_err());
        assert!(parse_command("binary_sensor.door", None, b"ON").is_err());
        assert_eq!(
            parse_command("cover.garage", None, b"CLOSE"),
            Ok(Command::State("closed".into()))
        );
        assert_eq!(
            parse_command("climate.hall", Some("temperature"), b"21.5"),
            Ok(Command::Attribute("temperature", json!(21.5)))
        );
        assert!(parse_command("climate.hall", Some("temperature"), b"NaN").is_err());
        assert!(parse_command("climate.hall", None, b"Heat!").is_err());
    }

    #[test]
    fn command_and_config_topics_parse_back_to_entity_ids() {
        let topics = Topics::new("homeassistant", "n1");
        assert_eq!(
            topics.parse_command("hearth/n1/light/porch/set"),
            Some(("light.porch".into(), None))
        );
        assert_eq!(
            topics.parse_command("hearth/n1/climate/hall/set/temperature"),
            Some(("climate.hall".into(), Some("temperature")))
        );
        assert_eq!(topics.parse_command("hearth/n1/light/porch/state"), None);
        assert_eq!(topics.parse_command("hearth/n2/light/porch/set"), None);
        assert_eq!(topics.parse_command("hearth/n1/Light/x/set"), None);
        assert_eq!(
            topics.parse_config("homeassistant/light/n1/porch/config"),
            Some("light.porch".into())
        );
        assert_eq!(
            topics.parse_config("homeassistant/light/n2/porch/config"),
            None
        );
    }
}
