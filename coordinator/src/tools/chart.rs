//! Shared chart plumbing: plotters draws into an in-memory RGB buffer, `image` encodes it.
//!
//! Text is rendered with Noto Sans Regular (Apache-2.0, from the `ttf-noto-sans` crate), so
//! charts need no system fonts. It is registered as plotters' `sans-serif` (plotters measures
//! text with it), but [`ChartBackend`] draws the glyphs itself, with ab_glyph.

use std::path::Path;
use std::sync::{Once, OnceLock};

use ab_glyph::{Font, FontRef, Glyph, ScaleFont, point};
use image::RgbImage;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{FontStyle, RGBColor, register_font};
use plotters_backend::text_anchor::{HPos, VPos};
use plotters_backend::{
    BackendColor, BackendCoord, BackendStyle, BackendTextStyle, DrawingErrorKind,
};

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

/// The chart font, parsed once (`None` if it does not parse: charts then have no text).
fn font() -> Option<&'static FontRef<'static>> {
    static FONT: OnceLock<Option<FontRef<'static>>> = OnceLock::new();
    FONT.get_or_init(|| FontRef::try_from_slice(ttf_noto_sans::REGULAR).ok())
        .as_ref()
}

/// The glyphs of `text` in the chart font at `size` pixels (from ascent to descent, as plotters
/// sizes text), each at its exact pen position: from x = 0, advancing by each glyph's advance
/// width and the kerning between pairs, on a baseline at y = size / 2 (where plotters puts it).
/// Also the `(width, height)` of the text's box as plotters reckons it: the sum of the advances,
/// and size / 1.24.
fn lay_out(font: &FontRef<'static>, text: &str, size: f32) -> (Vec<Glyph>, (i32, i32)) {
    let scaled = font.as_scaled(size);
    let mut pen = 0.0;
    let mut previous = None;
    let mut glyphs = Vec::with_capacity(text.len());
    for c in text.chars() {
        let id = scaled.glyph_id(c);
        if let Some(previous) = previous {
            pen += scaled.kern(previous, id);
        }
        previous = Some(id);
        glyphs.push(id.with_scale_and_position(size, point(pen, size / 2.0)));
        pen += scaled.h_advance(id);
    }
    (glyphs, (pen as i32, (size / 1.24) as i32))
}

/// Calls `pixel(x, y, coverage)` for every pixel the `glyphs` cover (coverage in (0, 1]).
fn rasterise(font: &FontRef<'static>, glyphs: Vec<Glyph>, mut pixel: impl FnMut(i32, i32, f32)) {
    for glyph in glyphs {
        if let Some(outline) = font.outline_glyph(glyph) {
            let origin = outline.px_bounds().min;
            outline.draw(|x, y, coverage| {
                if coverage > 0.0 {
                    pixel(
                        origin.x as i32 + x as i32,
                        origin.y as i32 + y as i32,
                        coverage.min(1.0),
                    );
                }
            });
        }
    }
}

/// plotters' bitmap backend, with text drawn by [`lay_out`] instead of by plotters.
///
/// plotters 0.3.7 (`style/font/ab_glyph.rs`) draws each glyph with the left edge of its ink at the
/// pen position, dropping the glyph's left side bearing, and rounds the pen down to whole pixels.
/// Glyphs whose ink sits inside a wide advance, such as `|`, `(`, `)`, `l` and `i`, then touch the
/// glyph before them and leave a gap after them: "KL(q(z|x) || p(z))" came out as
/// "KL(q(z| x) | |  p(z))". Here every glyph is outlined at its exact (sub-pixel) pen position,
/// side bearings included. Everything else is the bitmap backend's.
pub struct ChartBackend<'a>(BitMapBackend<'a>);

impl std::fmt::Debug for ChartBackend<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ChartBackend")
            .field(&self.0.get_size())
            .finish()
    }
}

/// What charts draw on.
pub type ChartArea<'a> = DrawingArea<ChartBackend<'a>, Shift>;

type BackendResult<'a> =
    std::result::Result<(), DrawingErrorKind<<BitMapBackend<'a> as DrawingBackend>::ErrorType>>;

impl<'a> DrawingBackend for ChartBackend<'a> {
    type ErrorType = <BitMapBackend<'a> as DrawingBackend>::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.0.get_size()
    }

    fn ensure_prepared(&mut self) -> BackendResult<'a> {
        self.0.ensure_prepared()
    }

    fn present(&mut self) -> BackendResult<'a> {
        self.0.present()
    }

    fn draw_pixel(&mut self, point: BackendCoord, color: BackendColor) -> BackendResult<'a> {
        self.0.draw_pixel(point, color)
    }

    fn draw_line<S: BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> BackendResult<'a> {
        self.0.draw_line(from, to, style)
    }

    fn draw_rect<S: BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> BackendResult<'a> {
        self.0.draw_rect(upper_left, bottom_right, style, fill)
    }

    fn draw_path<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> BackendResult<'a> {
        self.0.draw_path(path, style)
    }

    fn draw_circle<S: BackendStyle>(
        &mut self,
        center: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> BackendResult<'a> {
        self.0.draw_circle(center, radius, style, fill)
    }

    fn fill_polygon<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> BackendResult<'a> {
        self.0.fill_polygon(vert, style)
    }

    fn blit_bitmap(
        &mut self,
        pos: BackendCoord,
        size: (u32, u32),
        src: &[u8],
    ) -> BackendResult<'a> {
        self.0.blit_bitmap(pos, size, src)
    }

    fn estimate_text_size<S: BackendTextStyle>(
        &self,
        text: &str,
        style: &S,
    ) -> std::result::Result<(u32, u32), DrawingErrorKind<Self::ErrorType>> {
        let Some(font) = font() else {
            return Ok((0, 0));
        };
        let (_, (width, height)) = lay_out(font, text, style.size() as f32);
        Ok((width.max(0) as u32, height.max(0) as u32))
    }

    /// As plotters' default `draw_text` (anchor, rotation, colour), with [`lay_out`]'s glyphs.
    fn draw_text<S: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &S,
        pos: BackendCoord,
    ) -> BackendResult<'a> {
        let colour = style.color();
        let Some(font) = font().filter(|_| colour.alpha > 0.0) else {
            return Ok(());
        };
        let (glyphs, (width, height)) = lay_out(font, text, style.size() as f32);
        let dx = match style.anchor().h_pos {
            HPos::Left => 0,
            HPos::Right => -width,
            HPos::Center => -width / 2,
        };
        let dy = match style.anchor().v_pos {
            VPos::Top => 0,
            VPos::Center => -height / 2,
            VPos::Bottom => -height,
        };
        let transform = style.transform();
        let mut result = Ok(());
        rasterise(font, glyphs, |x, y, coverage| {
            let (x, y) = transform.transform(x + dx, y + dy);
            if result.is_ok() {
                result = self
                    .0
                    .draw_pixel((pos.0 + x, pos.1 + y), colour.mix(coverage.into()));
            }
        });
        result
    }
}

/// Maps any plotters error into ours, naming the chart.
pub fn draw_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Io(format!("cannot draw {what}: {e}"))
}

/// Draws a `width x height` chart with `draw` on a white background and writes it as PNG.
pub fn render_png(
    path: &Path,
    (width, height): (u32, u32),
    draw: impl FnOnce(&ChartArea<'_>) -> Result<()>,
) -> Result<()> {
    let img = render(width, height, draw)?;
    save_png(path, img)
}

/// Draws a `width x height` chart into an image.
pub fn render(
    width: u32,
    height: u32,
    draw: impl FnOnce(&ChartArea<'_>) -> Result<()>,
) -> Result<RgbImage> {
    register_fonts();
    let mut buffer = vec![0u8; width as usize * height as usize * 3];
    {
        let root = ChartBackend(BitMapBackend::with_buffer(&mut buffer, (width, height)))
            .into_drawing_area();
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

    /// The `(start, end)` columns of each run of ink when `text` is drawn at `size` pixels.
    fn ink_runs(text: &str, size: f32) -> Vec<(i32, i32)> {
        let font = font().expect("the embedded font parses");
        let (glyphs, (width, _)) = lay_out(font, text, size);
        let mut ink = vec![0.0f32; width as usize + 2 * size as usize];
        let shift = size as i32;
        rasterise(font, glyphs, |x, _, coverage| {
            ink[(x + shift) as usize] += coverage
        });
        let mut runs = Vec::new();
        let mut start = None;
        for (x, &v) in ink.iter().enumerate() {
            match (start, v > 0.5) {
                (None, true) => start = Some(x as i32 - shift),
                (Some(s), false) => {
                    runs.push((s, x as i32 - shift));
                    start = None;
                }
                _ => {}
            }
        }
        runs
    }

    #[test]
    fn narrow_glyphs_keep_their_side_bearings() {
        // Drawn with the ink at the pen (plotters' bug), a bar touched the glyph before it and
        // left a wide gap after it. With the side bearings, the gaps on either side of a
        // symmetric glyph between two symmetric glyphs are equal, to a pixel.
        for text in ["x|x", "n|n", "H|H", "o|o"] {
            let runs = ink_runs(text, 40.0);
            assert_eq!(runs.len(), 3, "{text}: ink runs {runs:?}");
            let left = runs[1].0 - runs[0].1;
            let right = runs[2].0 - runs[1].1;
            assert!(
                left >= 3 && (left - right).abs() <= 1,
                "{text}: gaps of {left} and {right} px around the bar"
            );
        }
        // The box plotters lays text out by is the sum of the advances.
        let font = font().unwrap();
        let (_, (one, _)) = lay_out(font, "|", 40.0);
        let (_, (three, height)) = lay_out(font, "|||", 40.0);
        assert!((three - 3 * one).abs() <= 2, "{one} {three}");
        assert_eq!(height, (40.0 / 1.24) as i32);
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
