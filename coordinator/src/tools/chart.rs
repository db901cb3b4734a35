//! Shared chart plumbing: plotters draws into an in-memory RGB buffer, `image` encodes it.
//!
//! Text is rendered by ab_glyph with Noto Sans Regular (Apache-2.0, from the `ttf-noto-sans`
//! crate) registered as plotters' `sans-serif`, so charts need no system fonts.

use std::path::Path;
use std::sync::Once;

use image::RgbImage;
use plotters::prelude::*;
use plotters::style::{FontStyle, RGBColor, register_font};

use super::images::save_png;
use crate::error::{Error, Result};

/// Series colours: the ten "tab10" colours of matplotlib, distinguishable and colour-blind-aware.
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Colour `i` of [`PALETTE`], cycling.
pub fn colour(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// Registers the embedded font once per process.
fn register_fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if register_font("sans-serif", FontStyle::Normal, ttf_noto_sans::REGULAR).is_err() {
            tracing::warn!("the embedded font did not load: charts will have no text");
        }
    });
}

/// Maps any plotters error into ours, naming the chart.
pub fn draw_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Io(format!("cannot draw {what}: {e}"))
}

/// Draws a `width x height` chart with `draw` on a white background and writes it as PNG.
pub fn render_png(
    path: &Path,
    (width, height): (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>) -> Result<()>,
) -> Result<()> {
    let img = render(width, height, draw)?;
    save_png(path, img)
}

/// Draws a `width x height` chart into an image.
pub fn render(
    width: u32,
    height: u32,
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>) -> Result<()>,
) -> Result<RgbImage> {
    register_fonts();
    let mut buffer = vec![0u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_error("a chart", e))?;
        draw(&root)?;
        root.present().map_err(|e| draw_error("a chart", e))?;
    }
    Ok(RgbImage::from_raw(width, height, buffer).expect("buffer holds width * height RGB pixels"))
}

/// An axis tick label: up to 3 decimals, without trailing zeros (`2`, `2.5`, `-140`).
pub fn tick(v: &f64) -> String {
    let text = format!("{v:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" {
        "0".into()
    } else {
        text.into()
    }
}

/// A padded `(lo, hi)` range covering `values` (finite ones), never empty.
pub fn padded_range(values: impl IntoIterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .into_iter()
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let span = hi - lo;
    let margin = if span > 0.0 {
        0.05 * span
    } else {
        0.5 * lo.abs().max(1.0)
    };
    (lo - margin, hi + margin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_padded_and_never_empty() {
        assert_eq!(padded_range([0.0, 10.0]), (-0.5, 10.5));
        assert_eq!(padded_range([2.0]), (1.0, 3.0));
        assert_eq!(padded_range([f64::NAN]), (0.0, 1.0));
        assert_eq!(padded_range([]), (0.0, 1.0));
    }

    #[test]
    fn ticks_drop_needless_decimals() {
        assert_eq!(tick(&2.0), "2");
        assert_eq!(tick(&-140.0), "-140");
        assert_eq!(tick(&2.5), "2.5");
        assert_eq!(tick(&0.30000000000000004), "0.3");
        assert_eq!(tick(&-0.0001), "0");
    }

    #[test]
    fn text_is_drawn_with_the_embedded_font() {
        // A chart with only a caption: dark pixels can come only from the glyphs.
        let img = render(200, 60, |root| {
            root.draw(&Text::new("ELBO", (10, 10), ("sans-serif", 30)))
                .map_err(|e| draw_error("text", e))
        })
        .unwrap();
        let dark = img.pixels().filter(|p| p.0[0] < 128).count();
        assert!(dark > 50, "only {dark} dark pixels: no text was drawn");
    }
}
