//! A small SVG plotting kit, enough for freqtag's figures: line charts with optional bands,
//! heatmaps, box plots per group and amplitude spectra with marked bins. Self-contained SVG text
//! (no fonts to embed, no scripts), so pages open offline and files diff cleanly.

use std::fmt::Write;

/// Colour-blind-safe palette (Okabe and Ito), cycled for series.
pub const PALETTE: [&str; 8] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442",
];

/// Escapes text for SVG/HTML.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// "Nice" ticks covering `[lo, hi]`: about `n` round steps (1, 2, 5 times a power of ten).
pub fn nice_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let (lo, hi) = if (hi - lo).abs() < 1e-12 {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi)
    };
    let raw = (hi - lo) / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

fn fmt_tick(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if !(1e-3..1e5).contains(&a) {
        format!("{v:.0e}")
    } else if a >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// The plotting area of a figure and its data ranges.
struct Frame {
    w: f64,
    h: f64,
    left: f64,
    right: f64,
    top: f64,
    bottom: f64,
    x: (f64, f64),
    y: (f64, f64),
}

impl Frame {
    fn px(&self, x: f64) -> f64 {
        self.left + (x - self.x.0) / (self.x.1 - self.x.0) * (self.w - self.left - self.right)
    }
    fn py(&self, y: f64) -> f64 {
        self.h
            - self.bottom
            - (y - self.y.0) / (self.y.1 - self.y.0) * (self.h - self.top - self.bottom)
    }
}

fn open(out: &mut String, w: f64, h: f64, title: &str) {
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12"><rect width="{w}" height="{h}" fill="white"/><text x="{}" y="20" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        w / 2.0,
        esc(title)
    );
}

/// Axes with ticks and labels; `x_ticks` may be replaced by category labels.
fn axes(out: &mut String, f: &Frame, xlabel: &str, ylabel: &str, x_ticks: Option<&[f64]>) {
    let (x0, x1, y0, y1) = (f.left, f.w - f.right, f.top, f.h - f.bottom);
    let _ = write!(
        out,
        r##"<rect x="{x0}" y="{y0}" width="{}" height="{}" fill="none" stroke="#333"/>"##,
        x1 - x0,
        y1 - y0
    );
    for t in nice_ticks(f.y.0, f.y.1, 6) {
        let y = f.py(t);
        let _ = write!(
            out,
            r##"<line x1="{x0}" x2="{x1}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            x0 - 4.0,
            y + 4.0,
            fmt_tick(t)
        );
    }
    let xt = match x_ticks {
        Some(t) => t.to_vec(),
        None => nice_ticks(f.x.0, f.x.1, 8),
    };
    for t in xt {
        let x = f.px(t);
        let _ = write!(
            out,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{y1}" y2="{}" stroke="#333"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
            y1 + 4.0,
            y1 + 17.0,
            fmt_tick(t)
        );
    }
    let _ = write!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text><text transform="translate(14,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        (x0 + x1) / 2.0,
        f.h - 8.0,
        esc(xlabel),
        (y0 + y1) / 2.0,
        esc(ylabel)
    );
}

/// One line of a line chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Points, drawn in the order given.
    pub points: Vec<(f64, f64)>,
    /// Optional band `(x, low, high)` drawn shaded behind the line.
    pub band: Vec<(f64, f64, f64)>,
}

/// A line chart of `series` with a legend; `y_range` fixes the y axis.
pub fn line_chart(
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[Series],
    y_range: Option<(f64, f64)>,
) -> String {
    let all_x = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let (xmin, xmax) = min_max(all_x).unwrap_or((0.0, 1.0));
    let all_y = series.iter().flat_map(|s| {
        s.points
            .iter()
            .map(|p| p.1)
            .chain(s.band.iter().flat_map(|b| [b.1, b.2]))
    });
    let (ymin, ymax) = y_range.or_else(|| min_max(all_y)).unwrap_or((0.0, 1.0));
    let f = Frame {
        w: 800.0,
        h: 440.0,
        left: 64.0,
        right: 200.0,
        top: 34.0,
        bottom: 46.0,
        x: pad_range(xmin, xmax, 0.02),
        y: pad_range(ymin, ymax, 0.04),
    };
    let mut out = String::new();
    open(&mut out, f.w, f.h, title);
    axes(&mut out, &f, xlabel, ylabel, None);
    for (i, s) in series.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        if !s.band.is_empty() {
            let mut d = String::new();
            for (j, (x, lo, _)) in s.band.iter().enumerate() {
                let _ = write!(
                    d,
                    "{}{:.1},{:.1} ",
                    if j == 0 { "M" } else { "L" },
                    f.px(*x),
                    f.py(*lo)
                );
            }
            for (x, _, hi) in s.band.iter().rev() {
                let _ = write!(d, "L{:.1},{:.1} ", f.px(*x), f.py(*hi));
            }
            let _ = write!(
                out,
                r#"<path d="{d}Z" fill="{c}" fill-opacity="0.18" stroke="none"/>"#
            );
        }
        let pts: Vec<String> = s
            .points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", f.px(*x), f.py(*y)))
            .collect();
        let _ = write!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"/>"#,
            pts.join(" ")
        );
        for p in &pts {
            let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = write!(out, r#"<circle cx="{x}" cy="{y}" r="3" fill="{c}"/>"#);
        }
        let ly = f.top + 14.0 + 28.0 * i as f64;
        let lx = f.w - f.right + 14.0;
        let _ = write!(
            out,
            r#"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{c}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            lx + 22.0,
            lx + 28.0,
            ly + 4.0,
            esc(&s.name)
        );
        if !s.band.is_empty() {
            let _ = write!(
                out,
                r##"<text x="{}" y="{}" font-size="10" fill="#555">shaded: min-max</text>"##,
                lx + 28.0,
                ly + 16.0
            );
        }
    }
    out.push_str("</svg>\n");
    out
}

fn min_max(it: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    it.filter(|v| v.is_finite()).fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((a, b)) => Some((a.min(v), b.max(v))),
    })
}

fn pad_range(lo: f64, hi: f64, frac: f64) -> (f64, f64) {
    if (hi - lo).abs() < 1e-12 {
        return (lo - 1.0, hi + 1.0);
    }
    let p = (hi - lo) * frac;
    (lo - p, hi + p)
}

/// A sequential colour for `t` in [0, 1] (dark blue through teal to yellow, viridis-like).
pub fn colour(t: f64) -> String {
    const STOPS: [(f64, f64, f64); 5] = [
        (68.0, 1.0, 84.0),
        (59.0, 82.0, 139.0),
        (33.0, 145.0, 140.0),
        (94.0, 201.0, 98.0),
        (253.0, 231.0, 37.0),
    ];
    let t = t.clamp(0.0, 1.0) * (STOPS.len() - 1) as f64;
    let i = (t.floor() as usize).min(STOPS.len() - 2);
    let u = t - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let m = |x: f64, y: f64| (x + (y - x) * u).round() as u8;
    format!("#{:02x}{:02x}{:02x}", m(a.0, b.0), m(a.1, b.1), m(a.2, b.2))
}

/// A heatmap: one row per label, one cell per column index; missing cells grey. The colour
/// scale spans `range` (or the data's range) and is drawn on the right.
pub fn heatmap(
    title: &str,
    rows: &[(String, Vec<Option<f64>>)],
    xlabel: &str,
    value_label: &str,
    range: Option<(f64, f64)>,
) -> String {
    let ncol = rows.iter().map(|r| r.1.len()).max().unwrap_or(1).max(1);
    let (lo, hi) = range
        .or_else(|| min_max(rows.iter().flat_map(|r| r.1.iter().flatten().copied())))
        .unwrap_or((0.0, 1.0));
    let hi = if hi > lo { hi } else { lo + 1.0 };
    let cell_h = (360.0 / rows.len().max(1) as f64).clamp(6.0, 18.0);
    let left = 150.0;
    let plot_w = 640.0;
    let cell_w = plot_w / ncol as f64;
    let h = 50.0 + cell_h * rows.len() as f64 + 40.0;
    let w = left + plot_w + 110.0;
    let mut out = String::new();
    open(&mut out, w, h, title);
    for (i, (label, vals)) in rows.iter().enumerate() {
        let y = 34.0 + cell_h * i as f64;
        let _ = write!(
            out,
            r#"<text x="{}" y="{:.1}" text-anchor="end" font-size="{:.0}">{}</text>"#,
            left - 6.0,
            y + cell_h * 0.75,
            (cell_h * 0.8).clamp(6.0, 12.0),
            esc(label)
        );
        for (j, v) in vals.iter().enumerate() {
            let fill = match v {
                Some(v) if v.is_finite() => colour((v - lo) / (hi - lo)),
                _ => "#cccccc".into(),
            };
            let _ = write!(
                out,
                r#"<rect x="{:.2}" y="{y:.2}" width="{:.2}" height="{cell_h:.2}" fill="{fill}"/>"#,
                left + cell_w * j as f64,
                cell_w + 0.3,
            );
        }
    }
    let bottom = 34.0 + cell_h * rows.len() as f64;
    let _ = write!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        left + plot_w / 2.0,
        bottom + 24.0,
        esc(xlabel)
    );
    // colour bar
    let bx = left + plot_w + 20.0;
    let bh = (bottom - 34.0).max(60.0);
    for k in 0..50 {
        let t = 1.0 - k as f64 / 49.0;
        let _ = write!(
            out,
            r#"<rect x="{bx}" y="{:.2}" width="16" height="{:.2}" fill="{}"/>"#,
            34.0 + bh * k as f64 / 50.0,
            bh / 50.0 + 0.5,
            colour(t)
        );
    }
    let _ = write!(
        out,
        r#"<text x="{}" y="40">{}</text><text x="{}" y="{:.1}">{}</text><text x="{}" y="{:.1}" font-size="11">{}</text>"#,
        bx + 20.0,
        fmt_tick(hi),
        bx + 20.0,
        34.0 + bh,
        fmt_tick(lo),
        bx - 4.0,
        bottom + 24.0,
        esc(value_label)
    );
    out.push_str("</svg>\n");
    out
}

/// Five-number summary of `v` (sorted inside): min, q1, median, q3, max.
pub fn five_numbers(v: &[f64]) -> Option<[f64; 5]> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let q = |p: f64| {
        let pos = p * (s.len() - 1) as f64;
        let (i, u) = (pos.floor() as usize, pos.fract());
        if i + 1 < s.len() {
            s[i] * (1.0 - u) + s[i + 1] * u
        } else {
            s[i]
        }
    };
    Some([s[0], q(0.25), q(0.5), q(0.75), s[s.len() - 1]])
}

/// Box plots, one per group (label, values), whiskers at min and max.
pub fn box_plot(title: &str, groups: &[(String, Vec<f64>)], ylabel: &str) -> String {
    let stats: Vec<Option<[f64; 5]>> = groups.iter().map(|g| five_numbers(&g.1)).collect();
    let (lo, hi) = min_max(stats.iter().flatten().flat_map(|s| [s[0], s[4]])).unwrap_or((0.0, 1.0));
    let n = groups.len().max(1);
    let f = Frame {
        w: 760.0f64.max(40.0 + 22.0 * n as f64),
        h: 440.0,
        left: 64.0,
        right: 20.0,
        top: 34.0,
        bottom: 120.0,
        x: (0.0, n as f64),
        y: pad_range(lo, hi, 0.04),
    };
    let mut out = String::new();
    open(&mut out, f.w, f.h, title);
    axes(&mut out, &f, "", ylabel, Some(&[]));
    let bw = ((f.px(1.0) - f.px(0.0)) * 0.6).min(40.0);
    for (i, (g, s)) in groups.iter().zip(&stats).enumerate() {
        let cx = f.px(i as f64 + 0.5);
        let _ = write!(
            out,
            r#"<text transform="translate({cx:.1},{:.1}) rotate(-60)" text-anchor="end" font-size="10">{}</text>"#,
            f.h - f.bottom + 10.0,
            esc(&g.0)
        );
        let Some([mn, q1, md, q3, mx]) = s else {
            continue;
        };
        let _ = write!(
            out,
            r##"<line x1="{cx:.1}" x2="{cx:.1}" y1="{:.1}" y2="{:.1}" stroke="#333"/><rect x="{:.1}" y="{:.1}" width="{bw:.1}" height="{:.1}" fill="#56B4E9" stroke="#333"/><line x1="{:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#000" stroke-width="2"/>"##,
            f.py(*mn),
            f.py(*mx),
            cx - bw / 2.0,
            f.py(*q3),
            (f.py(*q1) - f.py(*q3)).max(0.5),
            cx - bw / 2.0,
            cx + bw / 2.0,
            f.py(*md),
            f.py(*md),
        );
    }
    out.push_str("</svg>\n");
    out
}

/// A marked frequency: the bin's frequency, its legend group and its label.
#[derive(Debug, Clone)]
pub struct Mark {
    /// Frequency (Hz).
    pub hz: f64,
    /// Group: `tagged`, `harmonic`, `intermod`.
    pub kind: String,
    /// Label drawn above the bin (`f1`, `f1+f2`).
    pub label: String,
}

/// An amplitude spectrum as stems with the scored terms marked by colour. DC (bin 0), which no
/// score uses and which dwarfs the rest, is left out.
pub fn spectrum_chart(title: &str, bin_hz: f64, amp: &[f64], marks: &[Mark]) -> String {
    let n = amp.len().max(2);
    let (_, hi) = min_max(amp.iter().skip(1).copied()).unwrap_or((0.0, 1.0));
    let f = Frame {
        w: 760.0,
        h: 300.0,
        left: 64.0,
        right: 20.0,
        top: 34.0,
        bottom: 46.0,
        x: (0.0, bin_hz * (n - 1) as f64),
        y: (0.0, if hi > 0.0 { hi * 1.12 } else { 1.0 }),
    };
    let mut out = String::new();
    open(&mut out, f.w, f.h, title);
    axes(
        &mut out,
        &f,
        "frequency (Hz), DC not shown",
        "amplitude",
        None,
    );
    let kind_colour = |k: &str| match k {
        "tagged" => PALETTE[1],
        "harmonic" => PALETTE[4],
        "intermod" => PALETTE[2],
        _ => PALETTE[3],
    };
    let mut d = String::new();
    for (i, a) in amp.iter().enumerate().skip(1) {
        let x = f.px(bin_hz * i as f64);
        let _ = write!(d, "M{x:.1},{:.1}V{:.1}", f.py(0.0), f.py(*a));
    }
    let _ = write!(out, r##"<path d="{d}" stroke="#555" stroke-width="1.2"/>"##);
    for m in marks {
        let i = (m.hz / bin_hz).round() as usize;
        let a = amp.get(i).copied().unwrap_or(0.0);
        let x = f.px(bin_hz * i as f64);
        let c = kind_colour(&m.kind);
        let _ = write!(
            out,
            r#"<line x1="{x:.1}" x2="{x:.1}" y1="{:.1}" y2="{:.1}" stroke="{c}" stroke-width="3"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" font-size="10" fill="{c}">{}</text>"#,
            f.py(0.0),
            f.py(a),
            f.py(a) - 4.0,
            esc(&m.label)
        );
    }
    for (i, k) in ["tagged", "harmonic", "intermod"].iter().enumerate() {
        let x = f.w - f.right - 250.0 + 85.0 * i as f64;
        let _ = write!(
            out,
            r#"<rect x="{x}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{}">{k}</text>"#,
            f.top + 6.0,
            kind_colour(k),
            x + 16.0,
            f.top + 16.0
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(
            nice_ticks(0.0, 1.0, 5),
            vec![0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]
        );
        let t = nice_ticks(-3.0, 47.0, 5);
        assert_eq!(t, vec![0.0, 10.0, 20.0, 30.0, 40.0]);
        assert!(!nice_ticks(5.0, 5.0, 4).is_empty());
    }

    #[test]
    fn five_numbers_match_a_hand_computation() {
        let s = five_numbers(&[5.0, 1.0, 3.0, 2.0, 4.0, f64::NAN]).unwrap();
        assert_eq!(s, [1.0, 2.0, 3.0, 4.0, 5.0]);
        assert!(five_numbers(&[]).is_none());
    }

    #[test]
    fn charts_are_well_formed_and_escape_text() {
        let s = Series {
            name: "a<b".into(),
            points: vec![(0.0, 1.0), (0.5, 0.5)],
            band: vec![(0.0, 0.9, 1.0), (0.5, 0.4, 0.6)],
        };
        let svg = line_chart("t & u", "x", "y", &[s], Some((0.0, 1.0)));
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("a&lt;b") && svg.contains("t &amp; u"));
        let h = heatmap(
            "h",
            &[("l".into(), vec![Some(1.0), None])],
            "ch",
            "dB",
            None,
        );
        assert!(h.contains("#cccccc"));
        assert_eq!(colour(0.0), "#440154");
        assert_eq!(colour(1.0), "#fde725");
    }
}
