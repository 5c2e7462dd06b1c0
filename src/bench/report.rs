//! The bench's report: one JSON object, or a table for people.

use std::fmt::Write as _;

use serde::Serialize;

use super::Sizes;
use super::cluster::NodeHeads;

/// One measured figure, with its in-run baseline and target when it has them.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Figure {
    pub(crate) name: String,
    pub(crate) value: f64,
    pub(crate) unit: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) baseline: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) baseline_value: Option<f64>,
    /// value / baseline_value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) met: Option<bool>,
}

impl Figure {
    pub(crate) fn new(name: impl Into<String>, value: f64, unit: &'static str) -> Self {
        Self {
            name: name.into(),
            value,
            unit,
            baseline: None,
            baseline_value: None,
            ratio: None,
            target: None,
            met: None,
        }
    }

    pub(crate) fn baseline(mut self, name: impl Into<String>, value: f64) -> Self {
        self.baseline = Some(name.into());
        self.baseline_value = Some(value);
        self.ratio = (value > 0.0).then(|| self.value / value);
        self
    }

    pub(crate) fn target(mut self, text: impl Into<String>, met: bool) -> Self {
        self.target = Some(text.into());
        self.met = Some(met);
        self
    }
}

/// One scenario (or one size of it) and the heads every node ended with.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct ScenarioReport {
    pub(crate) scenario: &'static str,
    pub(crate) variant: String,
    pub(crate) figures: Vec<Figure>,
    pub(crate) nodes: Vec<NodeHeads>,
    /// Every node's heads root is the same.
    pub(crate) converged: bool,
    /// Why the scenario stopped before it could report, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
}

impl ScenarioReport {
    pub(crate) fn new(
        scenario: &'static str,
        variant: impl Into<String>,
        nodes: Vec<NodeHeads>,
    ) -> Self {
        let converged = !nodes.is_empty()
            && nodes
                .iter()
                .all(|n| !n.heads.is_empty() && n.heads == nodes[0].heads);
        Self {
            scenario,
            variant: variant.into(),
            figures: Vec::new(),
            nodes,
            converged,
            error: None,
        }
    }

    /// A scenario that failed part way: no figures, not converged, and the reason.
    pub(crate) fn failed(scenario: &'static str, error: String) -> Self {
        Self {
            error: Some(error),
            ..Self::new(scenario, "", Vec::new())
        }
    }

    pub(crate) fn figure(mut self, figure: Figure) -> Self {
        self.figures.push(figure);
        self
    }

    /// A figure by name, for scenarios that compare with an earlier one.
    pub(crate) fn get(&self, name: &str) -> Option<f64> {
        self.figures
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.value)
    }
}

/// The floor's parts, measured in this run.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Floor {
    pub(crate) samples: usize,
    pub(crate) tcp_echo_p50_us: f64,
    pub(crate) tcp_echo_p95_us: f64,
    pub(crate) automerge_put_apply_p50_us: f64,
    pub(crate) automerge_put_apply_p95_us: f64,
    /// Their sum: the least a change on A can take to be visible on B.
    pub(crate) floor_p50_us: f64,
    pub(crate) floor_p95_us: f64,
}

/// The machine the run had: figures taken under load are visibly so.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Machine {
    /// Cores this process may use.
    pub(crate) cores: usize,
    /// The 1, 5 and 15 minute load averages when the run started (Linux), else absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) load_average_start: Option<[f64; 3]>,
    /// The floor's p95 figures, once measured: TCP echo, Automerge put+apply.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) floor_tcp_echo_p95_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) floor_automerge_put_apply_p95_us: Option<f64>,
}

impl Machine {
    /// This machine now.
    pub(crate) fn now() -> Self {
        Self {
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            load_average_start: std::fs::read_to_string("/proc/loadavg")
                .ok()
                .and_then(|text| parse_loadavg(&text)),
            floor_tcp_echo_p95_us: None,
            floor_automerge_put_apply_p95_us: None,
        }
    }

    fn line(&self) -> String {
        let mut out = format!("machine: {} cores", self.cores);
        if let Some([one, five, fifteen]) = self.load_average_start {
            let _ = write!(
                out,
                ", load average {one:.2} {five:.2} {fifteen:.2} at start"
            );
        }
        if let (Some(tcp), Some(am)) = (
            self.floor_tcp_echo_p95_us,
            self.floor_automerge_put_apply_p95_us,
        ) {
            let _ = write!(
                out,
                ", floor p95: tcp echo {tcp:.0} us, automerge put+apply {am:.0} us"
            );
        }
        out
    }
}

/// The three load averages of `/proc/loadavg`'s text.
fn parse_loadavg(text: &str) -> Option<[f64; 3]> {
    let mut fields = text.split_whitespace().map(|f| f.parse::<f64>().ok());
    Some([fields.next()??, fields.next()??, fields.next()??])
}

/// Everything `hearth bench` prints.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub(crate) hearth_bench: u32,
    pub(crate) version: &'static str,
    /// `release` or `debug`: debug figures are not comparable with targets.
    pub(crate) profile: &'static str,
    pub(crate) quick: bool,
    pub(crate) machine: Machine,
    pub(crate) floor: Option<Floor>,
    pub(crate) scenarios: Vec<ScenarioReport>,
}

impl Report {
    pub(crate) fn new(sizes: &Sizes) -> Self {
        Self {
            hearth_bench: 1,
            version: env!("CARGO_PKG_VERSION"),
            profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            quick: sizes.quick,
            machine: Machine::now(),
            floor: None,
            scenarios: Vec::new(),
        }
    }

    /// Records the floor, in its own field and on the machine line.
    pub(crate) fn set_floor(&mut self, floor: Floor) {
        self.machine.floor_tcp_echo_p95_us = Some(floor.tcp_echo_p95_us);
        self.machine.floor_automerge_put_apply_p95_us = Some(floor.automerge_put_apply_p95_us);
        self.floor = Some(floor);
    }

    /// The first report of `scenario`, if it ran.
    pub(crate) fn find(&self, scenario: &str) -> Option<&ScenarioReport> {
        self.scenarios.iter().find(|s| s.scenario == scenario)
    }

    /// The report as an aligned table.
    pub(crate) fn table(&self) -> String {
        let mut rows: Vec<[String; 6]> = vec![[
            "scenario".into(),
            "figure".into(),
            "value".into(),
            "baseline".into(),
            "ratio".into(),
            "target".into(),
        ]];
        if let Some(f) = &self.floor {
            rows.push([
                "floor".into(),
                "tcp echo p50/p95".into(),
                format!("{:.0}/{:.0} us", f.tcp_echo_p50_us, f.tcp_echo_p95_us),
                String::new(),
                String::new(),
                String::new(),
            ]);
            rows.push([
                "floor".into(),
                "automerge put+apply p50/p95".into(),
                format!(
                    "{:.0}/{:.0} us",
                    f.automerge_put_apply_p50_us, f.automerge_put_apply_p95_us
                ),
                String::new(),
                String::new(),
                String::new(),
            ]);
        }
        for s in &self.scenarios {
            let label = if s.variant.is_empty() {
                s.scenario.to_string()
            } else {
                format!("{} {}", s.scenario, s.variant)
            };
            for f in &s.figures {
                rows.push([
                    label.clone(),
                    f.name.clone(),
                    format!("{} {}", number(f.value), f.unit),
                    match (&f.baseline, f.baseline_value) {
                        (Some(n), Some(v)) => format!("{n} {}", number(v)),
                        _ => String::new(),
                    },
                    f.ratio.map(|r| format!("{r:.2}x")).unwrap_or_default(),
                    match (&f.target, f.met) {
                        (Some(t), Some(true)) => format!("{t} (met)"),
                        (Some(t), _) => format!("{t} (MISSED)"),
                        _ => String::new(),
                    },
                ]);
            }
            rows.push([
                label,
                "converged".into(),
                if let Some(error) = &s.error {
                    format!("FAILED: {error}")
                } else if s.converged {
                    format!("yes, {} nodes at heads {}", s.nodes.len(), short(&s.nodes))
                } else {
                    format!("NO: {:?}", s.nodes)
                },
                String::new(),
                String::new(),
                String::new(),
            ]);
        }
        let mut widths = [0usize; 6];
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = format!(
            "hearth bench {} ({} build{})\n{}\n",
            self.version,
            self.profile,
            if self.quick { ", quick sizes" } else { "" },
            self.machine.line()
        );
        for row in rows {
            let mut line = String::new();
            for (w, cell) in widths.iter().zip(&row) {
                let _ = write!(line, "{cell:<w$}  ", w = *w);
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

fn short(nodes: &[NodeHeads]) -> String {
    nodes
        .first()
        .map(|n| n.heads.chars().take(12).collect())
        .unwrap_or_default()
}

fn number(v: f64) -> String {
    if v.abs() >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_scenario_shows_its_reason_in_the_table_and_the_json() {
        let mut report = Report {
            hearth_bench: 1,
            version: "test",
            profile: "debug",
            quick: true,
            machine: Machine {
                cores: 2,
                load_average_start: parse_loadavg("1.50 0.75 0.25 2/345 6789\n"),
                floor_tcp_echo_p95_us: None,
                floor_automerge_put_apply_p95_us: None,
            },
            floor: None,
            scenarios: Vec::new(),
        };
        report.scenarios.push(ScenarioReport::failed(
            "reconnect",
            "devices did not converge".into(),
        ));
        let table = report.table();
        assert!(
            table.contains("FAILED: devices did not converge"),
            "{table}"
        );
        assert!(
            table.contains("machine: 2 cores, load average 1.50 0.75 0.25 at start"),
            "{table}"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["machine"]["cores"], 2);
        assert_eq!(json["machine"]["load_average_start"][0], 1.5);
        assert_eq!(json["scenarios"][0]["converged"], false);
        assert_eq!(json["scenarios"][0]["error"], "devices did not converge");
    }
}
