//! `bench-report`: turns the benches' result files ([`crate::bench_results`]) into one
//! markdown page, `REPORT.md`, with a PNG per chart next to it. Sections come in a fixed
//! order (the benches `make bench` runs), each with its plots first and its tables after;
//! a bench with no result file gets a line saying so and the command that produces it.
//!
//! Plots are drawn by `plotters` into an RGB buffer and encoded with `png`; text uses
//! `ab_glyph` with DejaVu Sans compiled in (the `dejavu` crate), so rendering needs no
//! system font or font library.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, Context, Result};
use plotters::coord::ranged1d::{AsRangedCoord, SegmentValue, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::bench_results::{BenchResults, Chart, Series};

/// The benches `make bench` runs, in report order, with the command that produces each.
pub const KNOWN_BENCHES: &[(&str, &str)] = &[
    (
        "pg_wal_stream",
        "cargo bench -p syncbridge-tests --bench pg_wal_stream",
    ),
    (
        "pg_wal_stream_pgbench",
        "SB_BENCH_PG_WAL_LOAD=pgbench cargo bench -p syncbridge-tests --bench pg_wal_stream",
    ),
    (
        "pg_wal_trickle",
        "cargo bench -p syncbridge-tests --bench pg_wal_trickle",
    ),
    (
        "pg_backup_restore",
        "cargo bench -p syncbridge-tests --bench pg_backup_restore",
    ),
    (
        "pg_scaling_rates",
        "SB_BENCH_SCALING=rates cargo bench -p syncbridge-tests --bench pg_scaling",
    ),
    (
        "pg_scaling_plan",
        "SB_BENCH_SCALING=plan cargo bench -p syncbridge-tests --bench pg_scaling",
    ),
    (
        "pg_scaling_sizes",
        "SB_BENCH_SCALING=sizes cargo bench -p syncbridge-tests --bench pg_scaling",
    ),
    (
        "redis_capture",
        "cargo bench -p syncbridge-tests --bench redis_capture",
    ),
];

/// Plot size in pixels.
const SIZE: (u32, u32) = (960, 540);

/// Colours per series/tool, in order of first appearance.
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// What [`render`] wrote.
#[derive(Debug)]
pub struct Rendered {
    /// The markdown file.
    pub report: PathBuf,
    /// Every PNG written.
    pub images: Vec<PathBuf>,
    /// Known benches with no result file.
    pub missing: Vec<String>,
}

/// Reads every `*.json` in `results` and writes `out/REPORT.md` plus one PNG per chart.
pub fn render(results: &Path, out: &Path) -> Result<Rendered> {
    register_font()?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut found: BTreeMap<String, BenchResults> = BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir(results) {
        for entry in rd {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "json") {
                let r = BenchResults::load(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                found.insert(r.bench.clone(), r);
            }
        }
    }
    let mut order: Vec<String> = KNOWN_BENCHES.iter().map(|(b, _)| b.to_string()).collect();
    order.extend(
        found
            .keys()
            .filter(|k| !order.contains(k))
            .cloned()
            .collect::<Vec<_>>(),
    );

    let mut md = String::new();
    let mut images = Vec::new();
    let missing: Vec<String> = KNOWN_BENCHES
        .iter()
        .filter(|(b, _)| !found.contains_key(*b))
        .map(|(b, _)| b.to_string())
        .collect();
    writeln!(md, "# SyncBridge benchmark report\n")?;
    writeln!(
        md,
        "Rendered {} from {} result file(s) in `{}`. Ratios (`×`) compare the agent with the peer tool measured in the same run on the same machine; absolute figures on a shared 2-core machine are noise, the ratios are the result. How to read each section: `benches/README.md`.\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        found.len(),
        results.display()
    )?;
    if !missing.is_empty() {
        writeln!(md, "**Not in this report** (no result file):\n")?;
        for (b, cmd) in KNOWN_BENCHES
            .iter()
            .filter(|(b, _)| missing.iter().any(|m| m == b))
        {
            writeln!(md, "- `{b}`: run `{cmd}`")?;
        }
        writeln!(md)?;
    }
    let goals: Vec<(&BenchResults, &crate::bench_results::Goal)> = order
        .iter()
        .filter_map(|b| found.get(b))
        .flat_map(|r| r.goals.iter().map(move |g| (r, g)))
        .collect();
    if !goals.is_empty() {
        writeln!(md, "## Goals at a glance\n")?;
        writeln!(
            md,
            "| section | goal | measured | bound | |\n|---|---|---:|---:|---|"
        )?;
        for (r, g) in goals {
            writeln!(
                md,
                "| [{}](#{}) | {} | {} | {} | {} |",
                r.title,
                anchor(&r.title),
                g.what,
                g.render_value(),
                g.target,
                match g.met {
                    Some(true) => "met",
                    Some(false) => "**not met**",
                    None => "not measured",
                }
            )?;
        }
        writeln!(md)?;
    }
    writeln!(md, "Contents:\n")?;
    for b in order.iter().filter(|b| found.contains_key(*b)) {
        let r = &found[b];
        writeln!(md, "- [{}](#{})", r.title, anchor(&r.title))?;
    }
    writeln!(md)?;

    for b in &order {
        let Some(r) = found.get(b) else { continue };
        writeln!(md, "## {}\n", r.title)?;
        writeln!(
            md,
            "_`{}`, finished {}, took {:.1} min._\n",
            r.bench,
            r.finished,
            r.wall_secs / 60.0
        )?;
        for n in &r.notes {
            writeln!(md, "{n}\n")?;
        }
        for c in &r.charts {
            let name = format!("{}-{}.png", r.bench, sanitize(c.id()));
            let path = out.join(&name);
            draw(c, &path).with_context(|| format!("drawing {}", path.display()))?;
            images.push(path);
            writeln!(md, "![{}]({name})\n", c.title().replace(['[', ']'], ""))?;
        }
        for t in &r.tables {
            writeln!(md, "### {}\n", t.title)?;
            writeln!(md, "| {} |", t.columns.join(" | "))?;
            writeln!(
                md,
                "|{}",
                t.columns
                    .iter()
                    .enumerate()
                    .map(|(i, _)| if i == 0 { "---|" } else { "---:|" })
                    .collect::<String>()
            )?;
            for row in &t.rows {
                let cells: Vec<String> = row.iter().map(|c| c.render()).collect();
                writeln!(md, "| {} |", cells.join(" | "))?;
            }
            writeln!(md)?;
            if let Some(n) = &t.note {
                writeln!(md, "{n}\n")?;
            }
        }
    }
    let report = out.join("REPORT.md");
    std::fs::write(&report, md).with_context(|| format!("writing {}", report.display()))?;
    Ok(Rendered {
        report,
        images,
        missing,
    })
}

/// GitHub's heading anchor: lower case, spaces to dashes, punctuation dropped.
fn anchor(title: &str) -> String {
    title
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn sanitize(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn register_font() -> Result<()> {
    static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
            .map_err(|_| "the compiled-in DejaVu Sans font did not load".to_string())
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("plotting: {e}")
}

/// Draws one chart to a PNG file.
pub fn draw(chart: &Chart, path: &Path) -> Result<()> {
    register_font()?;
    let (w, h) = SIZE;
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        match chart {
            Chart::Lines {
                title,
                x_label,
                y_label,
                series,
                log_x,
                log_y,
                ..
            } => {
                let (x0, x1, y0, y1) = bounds(series, *log_x, *log_y);
                let labels = Labels {
                    title,
                    x: x_label,
                    y: y_label,
                };
                match (*log_x, *log_y) {
                    (false, false) => lines(&root, x0..x1, y0..y1, series, labels)?,
                    (true, false) => lines(&root, (x0..x1).log_scale(), y0..y1, series, labels)?,
                    (false, true) => lines(&root, x0..x1, (y0..y1).log_scale(), series, labels)?,
                    (true, true) => lines(
                        &root,
                        (x0..x1).log_scale(),
                        (y0..y1).log_scale(),
                        series,
                        labels,
                    )?,
                }
            }
            Chart::Bars {
                title,
                y_label,
                bars,
                ..
            } => bars_chart(&root, title, y_label, bars)?,
        }
        root.present().map_err(plot_err)?;
    }
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header()?;
    writer.write_image_data(&buf)?;
    writer.finish()?;
    Ok(())
}

struct Labels<'a> {
    title: &'a str,
    x: &'a str,
    y: &'a str,
}

/// Axis ranges covering every finite point (positive ones only on a log axis), padded.
fn bounds(series: &[Series], log_x: bool, log_y: bool) -> (f64, f64, f64, f64) {
    let pts = || {
        series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|(x, y)| {
                x.is_finite() && y.is_finite() && (!log_x || *x > 0.0) && (!log_y || *y > 0.0)
            })
    };
    let fold = |f: fn(&(f64, f64)) -> f64| {
        pts()
            .map(f)
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            })
    };
    let (mut x0, mut x1) = fold(|p| p.0);
    let (mut y0, mut y1) = fold(|p| p.1);
    if !x0.is_finite() {
        (x0, x1) = (1.0, 10.0);
    }
    if !y0.is_finite() {
        (y0, y1) = (1.0, 10.0);
    }
    if log_x {
        (x0, x1) = (x0 / 1.5, x1 * 1.5);
    } else if x1 <= x0 {
        (x0, x1) = (x0 - 1.0, x1 + 1.0);
    }
    if log_y {
        (y0, y1) = (y0 / 2.0, y1 * 2.0);
    } else {
        // Linear y starts at 0 for non-negative data, so heights compare honestly.
        y0 = y0.min(0.0);
        y1 = if y1 <= y0 { y0 + 1.0 } else { y1 * 1.1 };
    }
    (x0, x1, y0, y1)
}

fn lines<DB, X, Y>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    x: X,
    y: Y,
    series: &[Series],
    labels: Labels<'_>,
) -> Result<()>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
    X: AsRangedCoord<Value = f64>,
    Y: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(root)
        .caption(labels.title, ("sans-serif", 24))
        .margin(18)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(x, y)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc(labels.x)
        .y_desc(labels.y)
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .x_labels(8)
        .x_label_formatter(&|v| short(*v))
        .y_label_formatter(&|v| short(*v))
        .draw()
        .map_err(plot_err)?;
    let few_points = series.iter().all(|s| s.points.len() <= 12);
    for (i, s) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|(a, b)| a.is_finite() && b.is_finite())
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(plot_err)?
            .label(s.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        if few_points {
            chart
                .draw_series(pts.iter().map(|p| Circle::new(*p, 4, color.filled())))
                .map_err(plot_err)?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(plot_err)?;
    Ok(())
}

/// 1234567 -> "1.23M", 0.0042 -> "0.0042": tick labels that fit.
fn short(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.3}M", v / 1e6).replace(".000M", "M")
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        let s = format!("{v:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else if a >= 0.01 {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn bars_chart<DB>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    y_label: &str,
    bars: &[crate::bench_results::Bar],
) -> Result<()>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
{
    // One slot per bar, one empty slot between groups.
    let mut slots: Vec<Option<usize>> = Vec::new();
    for (i, b) in bars.iter().enumerate() {
        if i > 0 && bars[i - 1].group != b.group {
            slots.push(None);
        }
        slots.push(Some(i));
    }
    let n = slots.len().max(1) as i32;
    // The group's name goes under its middle bar.
    let mut group_label: BTreeMap<i32, String> = BTreeMap::new();
    let mut start = 0usize;
    for k in 0..=slots.len() {
        if k == slots.len() || slots[k].is_none() {
            if k > start {
                if let Some(i) = slots[(start + k - 1) / 2] {
                    group_label.insert(((start + k - 1) / 2) as i32, bars[i].group.clone());
                }
            }
            start = k + 1;
        }
    }
    let ymax = bars
        .iter()
        .map(|b| b.value)
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    // Headroom for the values above the bars and for the legend.
    let ymax = if ymax > 0.0 { ymax * 1.45 } else { 1.0 };
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 24))
        .margin(18)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d((0..n).into_segmented(), RangedCoordf64::from(0.0..ymax))
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(slots.len() + 1)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => group_label.get(i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .y_desc(y_label)
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 17))
        .y_label_formatter(&|v| short(*v))
        .draw()
        .map_err(plot_err)?;
    let mut tools: Vec<&str> = Vec::new();
    for b in bars {
        if !tools.contains(&b.label.as_str()) {
            tools.push(&b.label);
        }
    }
    for (t, tool) in tools.iter().enumerate() {
        let color = PALETTE[t % PALETTE.len()];
        let mine: Vec<(i32, f64)> = slots
            .iter()
            .enumerate()
            .filter_map(|(k, s)| s.map(|i| (k as i32, i)))
            .filter(|(_, i)| bars[*i].label == *tool && bars[*i].value.is_finite())
            .map(|(k, i)| (k, bars[i].value))
            .collect();
        chart
            .draw_series(mine.iter().map(|(k, v)| {
                let mut r = Rectangle::new(
                    [
                        (SegmentValue::Exact(*k), 0.0),
                        (SegmentValue::Exact(*k + 1), *v),
                    ],
                    color.filled(),
                );
                r.set_margin(0, 0, 6, 6);
                r
            }))
            .map_err(plot_err)?
            .label(*tool)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
    }
    let style = TextStyle::from(("sans-serif", 15).into_font())
        .pos(Pos::new(HPos::Center, VPos::Bottom))
        .color(&BLACK);
    for (k, s) in slots.iter().enumerate() {
        let Some(i) = s else { continue };
        let b = &bars[*i];
        if !b.value.is_finite() {
            continue;
        }
        let text = match &b.note {
            Some(n) => format!("{} ({n})", short(b.value)),
            None => short(b.value),
        };
        chart
            .draw_series(std::iter::once(Text::new(
                text,
                (SegmentValue::CenterOf(k as i32), b.value + ymax * 0.01),
                style.clone(),
            )))
            .map_err(plot_err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(plot_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::bench_results::{Bar, Cell};

    fn fixture() -> BenchResults {
        let mut r = BenchResults::new("pg_wal_stream", "WAL streaming vs pg_receivewal");
        r.note("512 MiB of WAL.");
        r.table(
            "Per receiver",
            &["receiver", "CPU s/GiB", "vs pg_receivewal --compress=lz4"],
            vec![
                vec![
                    Cell::text("agent"),
                    Cell::num(3.0, 2),
                    Cell::ratio(3.0, 1.4),
                ],
                vec![
                    Cell::text("pg_receivewal --compress=lz4"),
                    Cell::num(1.4, 2),
                    Cell::ratio(1.4, 1.4),
                ],
            ],
            Some("Goal: at most 1.00×."),
        );
        r.goal_at_most(
            "CPU s/GiB, agent ÷ pg_receivewal --compress=lz4",
            3.0 / 1.4,
            1.0,
        );
        r.goal_at_least("not measured here", f64::NAN, 1.0);
        r.chart(Chart::Lines {
            id: "lag".into(),
            title: "flush lag under load".into(),
            x_label: "seconds".into(),
            y_label: "lag, ms".into(),
            series: vec![
                Series {
                    name: "agent".into(),
                    points: (0..50)
                        .map(|i| (i as f64 * 0.2, 100.0 + i as f64))
                        .collect(),
                },
                Series {
                    name: "pg_receivewal".into(),
                    points: vec![(0.0, 5.0), (5.0, f64::NAN), (9.8, 20.0)],
                },
            ],
            log_x: false,
            log_y: false,
        });
        r.chart(Chart::Lines {
            id: "plan".into(),
            title: "planning time".into(),
            x_label: "objects".into(),
            y_label: "s".into(),
            series: vec![Series {
                name: "list".into(),
                points: vec![(1e4, 0.1), (1e5, 0.9)],
            }],
            log_x: true,
            log_y: true,
        });
        r.chart(Chart::Bars {
            id: "cpu".into(),
            title: "CPU s/GiB".into(),
            y_label: "CPU s per GiB".into(),
            bars: vec![
                Bar {
                    group: "file://".into(),
                    label: "agent".into(),
                    value: 3.0,
                    note: Some("2.14×".into()),
                },
                Bar {
                    group: "file://".into(),
                    label: "pg_receivewal --compress=lz4".into(),
                    value: 1.4,
                    note: None,
                },
                Bar {
                    group: "S3".into(),
                    label: "agent".into(),
                    value: f64::NAN,
                    note: None,
                },
            ],
        });
        r
    }

    #[test]
    fn renders_tables_and_png_plots_from_a_fixture_and_names_missing_benches() {
        let dir = tempfile::tempdir().unwrap();
        let results = dir.path().join("results");
        std::fs::create_dir_all(&results).unwrap();
        std::fs::write(
            results.join("pg_wal_stream.json"),
            serde_json::to_vec(&fixture()).unwrap(),
        )
        .unwrap();
        let out = dir.path().join("report");
        let done = render(&results, &out).unwrap();
        let md = std::fs::read_to_string(&done.report).unwrap();
        assert!(md.contains("## WAL streaming vs pg_receivewal"), "{md}");
        assert!(
            md.contains("| receiver | CPU s/GiB | vs pg_receivewal --compress=lz4 |"),
            "{md}"
        );
        assert!(md.contains("| agent | 3.00 | 2.14× |"), "{md}");
        assert!(
            md.contains("![flush lag under load](pg_wal_stream-lag.png)"),
            "{md}"
        );
        assert!(md.contains("`pg_wal_trickle`: run `cargo bench"), "{md}");
        assert!(
            md.contains("| CPU s/GiB, agent ÷ pg_receivewal --compress=lz4 | 2.14× | ≤ 1.00× | **not met** |"),
            "{md}"
        );
        assert!(
            md.contains("| not measured here | n/a | ≥ 1.00× | not measured |"),
            "{md}"
        );
        assert_eq!(done.images.len(), 3);
        assert!(done.missing.contains(&"pg_backup_restore".to_string()));
        for img in &done.images {
            let bytes = std::fs::read(img).unwrap();
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", img.display());
            let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
            let reader = decoder.read_info().unwrap();
            assert_eq!((reader.info().width, reader.info().height), SIZE);
        }
        // The plot is not blank: text and lines left non-white pixels.
        let decoder = png::Decoder::new(std::fs::File::open(&done.images[0]).unwrap());
        let mut reader = decoder.read_info().unwrap();
        let mut px = vec![0; reader.output_buffer_size()];
        reader.next_frame(&mut px).unwrap();
        let dark = px.chunks(3).filter(|p| p.iter().all(|c| *c < 100)).count();
        assert!(dark > 1000, "only {dark} dark pixels");
    }

    #[test]
    fn an_empty_results_directory_still_gives_a_report_listing_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let done = render(&dir.path().join("none"), &dir.path().join("out")).unwrap();
        assert_eq!(done.missing.len(), KNOWN_BENCHES.len());
        assert!(done.images.is_empty());
        let md = std::fs::read_to_string(done.report).unwrap();
        assert!(md.contains("Not in this report"), "{md}");
    }

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(short(100_000.0), "100k");
        assert_eq!(short(2_500_000.0), "2.500M");
        assert_eq!(short(1.5), "1.5");
        assert_eq!(short(0.25), "0.25");
        assert_eq!(short(0.0), "0");
    }
}
