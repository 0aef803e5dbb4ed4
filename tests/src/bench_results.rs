//! What a benchmark hands to the report: each bench in `benches/` ends by writing
//! `<target>/bench-results/<bench>.json` (a [`BenchResults`]: tables of typed cells and the
//! data of its charts), and `bench-report` ([`crate::bench_report`]) turns every such file
//! into one markdown page with PNG plots. The benches keep printing their own tables; this
//! is the same numbers, kept.
//!
//! Ratios: wherever a peer tool was measured in the same run, a table carries the agent's
//! figure divided by the peer's ([`Cell::ratio`]), so a reader never compares absolute
//! times taken minutes apart on a shared machine.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Everything one bench run produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchResults {
    /// File stem and section id, e.g. `pg_wal_stream`.
    pub bench: String,
    /// Section heading in the report.
    pub title: String,
    /// When the run finished (RFC 3339, UTC).
    pub finished: String,
    /// Wall time of the bench, seconds (for benches/README.md's timings): the process's
    /// age when saved, unless the bench set it (a part of a bench).
    pub wall_secs: f64,
    /// Markdown paragraphs shown before the tables: workload, sizes, caveats.
    pub notes: Vec<String>,
    /// Tables, in order.
    pub tables: Vec<Table>,
    /// Charts, in order; each becomes `<bench>-<id>.png`.
    pub charts: Vec<Chart>,
    /// The issue's goals this run checked, gathered at the top of the report.
    #[serde(default)]
    pub goals: Vec<Goal>,
}

/// A goal checked by a run: a measured figure (usually a ratio to a peer in the same run)
/// against its bound.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Goal {
    /// What is measured, e.g. "restore speed, agent ÷ pgBackRest (S3)".
    pub what: String,
    /// The figure; `None` when it could not be measured.
    pub value: Option<f64>,
    /// The bound as text, e.g. "≥ 1.20×".
    pub target: String,
    /// Whether the figure meets the bound; `None` when not measured.
    pub met: Option<bool>,
    /// Written after the figure: `×` for a ratio (the default, and what files from before
    /// this field hold), ` s` for seconds.
    #[serde(default = "ratio_unit")]
    pub unit: String,
}

fn ratio_unit() -> String {
    "×".into()
}

impl Goal {
    /// The measured figure as shown in the report, e.g. `1.23×` or `0.37 s`.
    pub fn render_value(&self) -> String {
        self.value
            .map_or("n/a".into(), |v| format!("{v:.2}{}", self.unit))
    }
}

/// A table of typed cells.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Table {
    /// Heading above the table.
    pub title: String,
    /// Column headers.
    pub columns: Vec<String>,
    /// Rows, each as long as `columns`.
    pub rows: Vec<Vec<Cell>>,
    /// Shown under the table (how to read it, what the goal is).
    pub note: Option<String>,
}

/// One table cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Cell {
    /// Text as is.
    Text(String),
    /// A number shown with `decimals` digits after the point; `None` (not measured, or
    /// NaN) shows as `n/a`.
    Num {
        /// The value.
        value: Option<f64>,
        /// Digits after the decimal point.
        decimals: u8,
    },
    /// A ratio to a peer measured in the same run, shown as `1.23×`.
    Ratio(Option<f64>),
}

impl Cell {
    /// A text cell.
    pub fn text(s: impl Into<String>) -> Cell {
        Cell::Text(s.into())
    }

    /// A number; NaN and infinities become "not measured".
    pub fn num(value: f64, decimals: u8) -> Cell {
        Cell::Num {
            value: value.is_finite().then_some(value),
            decimals,
        }
    }

    /// `agent / peer`; "not measured" when either is missing or the peer is 0.
    pub fn ratio(agent: f64, peer: f64) -> Cell {
        let r = agent / peer;
        Cell::Ratio(r.is_finite().then_some(r))
    }

    /// How the cell reads in markdown.
    pub fn render(&self) -> String {
        match self {
            Cell::Text(s) => s.replace('|', "\\|"),
            Cell::Num {
                value: Some(v),
                decimals,
            } => format!("{v:.*}", *decimals as usize),
            Cell::Ratio(Some(r)) => format!("{r:.2}×"),
            Cell::Num { value: None, .. } | Cell::Ratio(None) => "n/a".into(),
        }
    }
}

/// A plot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Chart {
    /// Lines through (x, y) points, one per series, e.g. lag over time per receiver.
    Lines {
        /// File-name-safe id, unique within the bench.
        id: String,
        /// Caption.
        title: String,
        /// Axis labels.
        x_label: String,
        /// Axis labels.
        y_label: String,
        /// The series.
        series: Vec<Series>,
        /// Logarithmic x axis (for sizes and rates growing by factors).
        log_x: bool,
        /// Logarithmic y axis.
        log_y: bool,
    },
    /// Vertical bars in groups, e.g. MiB/s per tool for backup and for restore.
    Bars {
        /// File-name-safe id, unique within the bench.
        id: String,
        /// Caption.
        title: String,
        /// Y axis label.
        y_label: String,
        /// The bars, drawn in order; a new `group` starts a new cluster.
        bars: Vec<Bar>,
    },
}

impl Chart {
    /// The chart's id.
    pub fn id(&self) -> &str {
        match self {
            Chart::Lines { id, .. } | Chart::Bars { id, .. } => id,
        }
    }

    /// The chart's caption.
    pub fn title(&self) -> &str {
        match self {
            Chart::Lines { title, .. } | Chart::Bars { title, .. } => title,
        }
    }
}

/// One line of a [`Chart::Lines`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Series {
    /// Legend entry (the tool).
    pub name: String,
    /// Points in x order; non-finite ones are skipped when drawing (JSON keeps them as
    /// `null`).
    #[serde(deserialize_with = "points_nan_if_null")]
    pub points: Vec<(f64, f64)>,
}

/// One bar of a [`Chart::Bars`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bar {
    /// The cluster it belongs to (e.g. `backup`), shown under the cluster.
    pub group: String,
    /// The tool; one colour per distinct label across the chart, with a legend.
    pub label: String,
    /// Height; not drawn when not finite (`null` in JSON).
    #[serde(deserialize_with = "nan_if_null")]
    pub value: f64,
    /// Written above the bar, e.g. the ratio to the peer (`1.31× pgBackRest`).
    pub note: Option<String>,
}

impl BenchResults {
    /// An empty result set for `bench` (the `benches/<bench>.rs` stem).
    pub fn new(bench: &str, title: &str) -> BenchResults {
        BenchResults {
            bench: bench.into(),
            title: title.into(),
            finished: String::new(),
            wall_secs: 0.0,
            notes: Vec::new(),
            tables: Vec::new(),
            charts: Vec::new(),
            goals: Vec::new(),
        }
    }

    /// Records a goal `value ≥ min` (a ratio, shown as `1.23×`).
    pub fn goal_at_least(&mut self, what: &str, value: f64, min: f64) -> &mut Self {
        let value = value.is_finite().then_some(value);
        self.goals.push(Goal {
            what: what.into(),
            value,
            target: format!("≥ {min:.2}×"),
            met: value.map(|v| v >= min),
            unit: ratio_unit(),
        });
        self
    }

    /// Records a goal `value ≤ max` (a ratio, shown as `1.23×`).
    pub fn goal_at_most(&mut self, what: &str, value: f64, max: f64) -> &mut Self {
        let value = value.is_finite().then_some(value);
        self.goals.push(Goal {
            what: what.into(),
            value,
            target: format!("≤ {max:.2}×"),
            met: value.map(|v| v <= max),
            unit: ratio_unit(),
        });
        self
    }

    /// Records a goal on a duration: `secs ≤ max_secs` (shown as `0.37 s`).
    pub fn goal_at_most_secs(&mut self, what: &str, secs: f64, max_secs: f64) -> &mut Self {
        let value = secs.is_finite().then_some(secs);
        self.goals.push(Goal {
            what: what.into(),
            value,
            target: format!("≤ {max_secs:.2} s"),
            met: value.map(|v| v <= max_secs),
            unit: " s".into(),
        });
        self
    }

    /// Adds a paragraph.
    pub fn note(&mut self, text: impl Into<String>) -> &mut Self {
        self.notes.push(text.into());
        self
    }

    /// Adds a table.
    pub fn table(
        &mut self,
        title: &str,
        columns: &[&str],
        rows: Vec<Vec<Cell>>,
        note: Option<&str>,
    ) -> &mut Self {
        self.tables.push(Table {
            title: title.into(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows,
            note: note.map(str::to_string),
        });
        self
    }

    /// Adds a chart.
    pub fn chart(&mut self, chart: Chart) -> &mut Self {
        self.charts.push(chart);
        self
    }

    /// Writes `<dir>/<bench>.json` (see [`results_dir`]), stamping the finish time and,
    /// unless already set, the process's wall time so far; returns the path. A bench that cannot write its results
    /// says so on stderr and carries on: the printed tables are still there.
    pub fn save(&mut self) -> Option<PathBuf> {
        self.finished = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        if self.wall_secs <= 0.0 {
            self.wall_secs = process_age_secs().unwrap_or(0.0);
        }
        let dir = results_dir();
        let path = dir.join(format!("{}.json", self.bench));
        let written = std::fs::create_dir_all(&dir)
            .map_err(anyhow::Error::from)
            .and_then(|()| Ok(serde_json::to_vec_pretty(self)?))
            .and_then(|json| Ok(std::fs::write(&path, json)?));
        match written {
            Ok(()) => {
                eprintln!("results written to {}", path.display());
                Some(path)
            }
            Err(e) => {
                eprintln!("could not write {}: {e:#}", path.display());
                None
            }
        }
    }

    /// Like [`save`](Self::save), but appends to the file this same process already wrote
    /// for the bench, if any (for benches whose parts each save what they measured); a file
    /// left by an earlier run is replaced.
    pub fn save_merged(&mut self) -> Option<PathBuf> {
        let path = results_dir().join(format!("{}.json", self.bench));
        if let Some(prev) = std::fs::read(&path)
            .ok()
            .filter(|_| written_before(&path))
            .and_then(|b| serde_json::from_slice::<BenchResults>(&b).ok())
        {
            let mut merged = prev;
            merged.notes.append(&mut self.notes);
            merged.tables.append(&mut self.tables);
            merged.charts.append(&mut self.charts);
            merged.goals.append(&mut self.goals);
            *self = merged;
        }
        let out = self.save();
        mark_written(&path);
        out
    }

    /// Reads a results file.
    pub fn load(path: &Path) -> anyhow::Result<BenchResults> {
        let bytes = std::fs::read(path)?;
        Ok(serde_json::from_slice(&bytes)?)
    }
}

/// serde_json writes NaN as `null`; read it back as NaN.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

fn points_nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<(f64, f64)>, D::Error> {
    Ok(Vec::<(Option<f64>, Option<f64>)>::deserialize(d)?
        .into_iter()
        .map(|(x, y)| (x.unwrap_or(f64::NAN), y.unwrap_or(f64::NAN)))
        .collect())
}

static WRITTEN: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

fn written_before(path: &Path) -> bool {
    WRITTEN
        .lock()
        .map(|w| w.iter().any(|p| p == path))
        .unwrap_or(false)
}

fn mark_written(path: &Path) {
    if let Ok(mut w) = WRITTEN.lock() {
        w.push(path.to_path_buf());
    }
}

/// Where results go: `$SB_BENCH_RESULTS_DIR`, else `bench-results/` in the cargo target
/// directory the running executable was built in (found by cargo's `CACHEDIR.TAG`), else
/// `target/bench-results` in the repository.
pub fn results_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SB_BENCH_RESULTS_DIR") {
        return PathBuf::from(d);
    }
    target_dir().join("bench-results")
}

/// The cargo target directory of the running executable (see [`results_dir`]).
pub fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            exe.ancestors()
                .find(|d| d.join("CACHEDIR.TAG").is_file())
                .map(Path::to_path_buf)
        })
        .unwrap_or_else(|| crate::paths::repo_root().join("target"))
}

/// Seconds since this process started (from /proc), for the bench's own wall time.
fn process_age_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after = stat.rsplit_once(')')?.1;
    let start_ticks: f64 = after.split_whitespace().nth(19)?.parse().ok()?;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(uptime - start_ticks / 100.0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn cells_render_numbers_ratios_and_missing_values() {
        assert_eq!(Cell::num(12.3456, 2).render(), "12.35");
        assert_eq!(Cell::num(f64::NAN, 2).render(), "n/a");
        assert_eq!(Cell::ratio(3.0, 1.5).render(), "2.00×");
        assert_eq!(Cell::ratio(1.0, 0.0).render(), "n/a");
        assert_eq!(Cell::text("a|b").render(), "a\\|b");
    }

    #[test]
    fn goals_render_ratios_and_seconds_and_old_files_read_as_ratios() {
        let mut r = BenchResults::new("b", "B");
        r.goal_at_least("speed", 1.234, 1.0)
            .goal_at_most_secs("planning", 0.371, 2.0)
            .goal_at_most_secs("not measured", f64::NAN, 2.0);
        assert_eq!(r.goals[0].render_value(), "1.23×");
        assert_eq!(
            (
                r.goals[1].render_value().as_str(),
                r.goals[1].target.as_str()
            ),
            ("0.37 s", "≤ 2.00 s")
        );
        assert_eq!(r.goals[1].met, Some(true));
        assert_eq!(
            (r.goals[2].render_value().as_str(), r.goals[2].met),
            ("n/a", None)
        );
        let old = r#"{"what":"w","value":1.5,"target":"≥ 1.00×","met":true}"#;
        let g: Goal = serde_json::from_str(old).unwrap();
        assert_eq!(g.render_value(), "1.50×");
    }

    #[test]
    fn process_age_is_known_on_linux() {
        let age = process_age_secs().unwrap();
        assert!((0.0..86_400.0 * 365.0).contains(&age), "{age}");
    }
}
