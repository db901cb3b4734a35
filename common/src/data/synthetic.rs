//! The built-in dataset: procedurally drawn 28 x 28 grayscale shapes.
//!
//! Each example is one anti-aliased outline or stroke shape on a black background, drawn from a
//! handful of independent, interpretable factors of variation ([`ShapeParams`]): the shape class
//! (the label), its position, size, rotation, stroke width and brightness. Every example is a pure
//! function of `(seed, index)` through [`KeyedRng`], so generation runs in parallel and gives the
//! same bytes on any number of threads.

use std::f64::consts::TAU;

use rayon::prelude::*;

use super::Dataset;
use crate::model::{KeyedRng, domain};

/// Images are `SIDE x SIDE` pixels, like MNIST.
pub const SIDE: usize = 28;
/// Examples in the training part of [`synthetic`].
pub const SYNTHETIC_TRAIN: usize = 60_000;
/// Examples in the held-out tail of [`synthetic`] (MNIST's test-split size).
pub const SYNTHETIC_HELDOUT: usize = 10_000;
/// The seed of the default synthetic dataset: the data stays fixed when the training seed changes.
pub const DEFAULT_SYNTHETIC_SEED: u64 = 0;

/// The shape class of an example: its label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    /// A circle outline.
    Ring,
    /// A square outline.
    Square,
    /// An equilateral-triangle outline.
    Triangle,
    /// Two crossed bars of equal length.
    Plus,
    /// One straight bar.
    Bar,
}

impl Shape {
    /// Every class, in label order.
    pub const ALL: [Shape; 5] = [
        Shape::Ring,
        Shape::Square,
        Shape::Triangle,
        Shape::Plus,
        Shape::Bar,
    ];

    /// The label stored in the dataset: the index in [`Shape::ALL`].
    pub fn label(self) -> u8 {
        self as u8
    }

    /// The class with this label, if any.
    pub fn from_label(label: u8) -> Option<Shape> {
        Shape::ALL.get(label as usize).copied()
    }

    /// A lower-case name for plots and logs.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Ring => "ring",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Plus => "plus",
            Shape::Bar => "bar",
        }
    }
}

/// The factors of variation of one example. Lengths are in pixels; `(0, 0)` is the top-left
/// corner of the image, so its centre is `(14, 14)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShapeParams {
    pub shape: Shape,
    /// `(x, y)` of the shape's centre: uniform over the square of positions where the shape fits
    /// inside the image at any rotation, with a pixel to spare (so big shapes move less).
    pub center: (f32, f32),
    /// Circumradius: the distance from the centre to the farthest point of the shape's centre
    /// line (a corner, a bar's end). Uniform in [`SIZE_RANGE`].
    pub size: f32,
    /// Rotation in radians, uniform in [0, 2 pi).
    pub angle: f32,
    /// Line width. Uniform in [`STROKE_RANGE`].
    pub stroke: f32,
    /// Pixel value of fully covered pixels. Uniform in [`INTENSITY_RANGE`].
    pub intensity: f32,
}

/// Circumradius range: from about half the image width to almost all of it.
pub const SIZE_RANGE: (f32, f32) = (6.5, 11.0);
/// Line width range, thin pen to thick marker (MNIST strokes are ~2-3 pixels).
pub const STROKE_RANGE: (f32, f32) = (1.5, 3.0);
/// Brightness range: never faint enough to vanish.
pub const INTENSITY_RANGE: (f32, f32) = (0.6, 1.0);
/// Width of the anti-aliasing ramp at an edge, in pixels: a little softer than a 1-pixel box
/// filter, closer to the look of scanned digits.
const EDGE_SOFTNESS: f32 = 1.25;
/// Empty pixels kept between the shape's outer edge and the image border.
const MARGIN: f32 = 1.0;

impl ShapeParams {
    /// The factors of example `index` of the dataset with this `seed`.
    pub fn sample(seed: u64, index: u64) -> Self {
        let mut rng = KeyedRng::new(&[domain::SYNTHETIC, seed, index]);
        let shape = Shape::ALL[rng.below(Shape::ALL.len() as u64) as usize];
        let mut uniform = |(lo, hi): (f32, f32)| lo + (hi - lo) * rng.next_open01() as f32;
        let size = uniform(SIZE_RANGE);
        let stroke = uniform(STROKE_RANGE);
        let intensity = uniform(INTENSITY_RANGE);
        let angle = uniform((0.0, TAU as f32));
        // Keep the whole shape, whatever its rotation, inside the image.
        let half = SIDE as f32 / 2.0;
        let slack = (half - size - stroke / 2.0 - EDGE_SOFTNESS / 2.0 - MARGIN).max(0.0);
        let cx = half + uniform((-slack, slack));
        let cy = half + uniform((-slack, slack));
        ShapeParams {
            shape,
            center: (cx, cy),
            size,
            angle,
            stroke,
            intensity,
        }
    }

    /// Draws the shape into `out`, a `SIDE * SIDE` row-major image (overwritten: background 0).
    ///
    /// # Panics
    /// If `out` does not hold `SIDE * SIDE` pixels.
    pub fn render(&self, out: &mut [f32]) {
        assert_eq!(
            out.len(),
            SIDE * SIDE,
            "render needs a {SIDE} x {SIDE} image"
        );
        out.fill(0.0);
        let (sin, cos) = (self.angle as f64).sin_cos();
        let (sin, cos) = (sin as f32, cos as f32);
        let half_stroke = self.stroke / 2.0;
        // Beyond this distance from the centre every pixel is background.
        let reach = self.size + half_stroke + EDGE_SOFTNESS;
        for (y, row) in out.chunks_exact_mut(SIDE).enumerate() {
            let dy = y as f32 + 0.5 - self.center.1;
            if dy.abs() > reach {
                continue;
            }
            for (x, pixel) in row.iter_mut().enumerate() {
                let dx = x as f32 + 0.5 - self.center.0;
                if dx * dx + dy * dy > reach * reach {
                    continue;
                }
                // Into the shape's frame: rotate by -angle.
                let p = (cos * dx + sin * dy, -sin * dx + cos * dy);
                let d = self.distance(p, half_stroke);
                let coverage = (0.5 - d / EDGE_SOFTNESS).clamp(0.0, 1.0);
                *pixel = coverage * self.intensity;
            }
        }
    }

    /// Signed distance from `p` (shape frame) to the drawn region: negative inside.
    fn distance(&self, p: (f32, f32), half_stroke: f32) -> f32 {
        let r = self.size;
        match self.shape {
            // The circle a little smaller than its circumradius so it looks as big as the others.
            Shape::Ring => (length(p) - 0.85 * r).abs() - half_stroke,
            Shape::Square => {
                let a = r * std::f32::consts::FRAC_1_SQRT_2;
                sd_box(p, (a, a)).abs() - half_stroke
            }
            Shape::Triangle => sd_equilateral_triangle(p, r).abs() - half_stroke,
            Shape::Plus => sd_box(p, (r, half_stroke)).min(sd_box(p, (half_stroke, r))),
            Shape::Bar => sd_box(p, (r, half_stroke)),
        }
    }
}

fn length((x, y): (f32, f32)) -> f32 {
    (x * x + y * y).sqrt()
}

/// Signed distance to an axis-aligned box of half-extents `b` centred at the origin.
fn sd_box((px, py): (f32, f32), (bx, by): (f32, f32)) -> f32 {
    let (qx, qy) = (px.abs() - bx, py.abs() - by);
    length((qx.max(0.0), qy.max(0.0))) + qx.max(qy).min(0.0)
}

/// Signed distance to an equilateral triangle with circumradius `r` centred at the origin, one
/// corner on the +y axis (Inigo Quilez's exact formula).
fn sd_equilateral_triangle((px, py): (f32, f32), r: f32) -> f32 {
    const K: f32 = 1.732_050_8; // sqrt(3)
    let half_side = r * K / 2.0;
    let (mut x, mut y) = (px.abs() - half_side, py + half_side / K);
    if x + K * y > 0.0 {
        (x, y) = ((x - K * y) / 2.0, (-K * x - y) / 2.0);
    }
    x -= x.clamp(-2.0 * half_side, 0.0);
    -length((x, y)) * y.signum()
}

/// The default dataset: [`SYNTHETIC_TRAIN`] + [`SYNTHETIC_HELDOUT`] examples, the held-out ones
/// last. Labels are [`Shape::label`]; pixels are in [0, 1].
pub fn synthetic(seed: u64) -> Dataset {
    synthetic_with(SYNTHETIC_TRAIN + SYNTHETIC_HELDOUT, seed)
}

/// The first `n` examples of the synthetic dataset with this `seed`, for small experiments and
/// tests.
///
/// # Panics
/// If `n` is 0: a dataset has at least one example.
pub fn synthetic_with(n: usize, seed: u64) -> Dataset {
    assert!(
        n > 0,
        "synthetic_with(0, _): a dataset needs at least one example"
    );
    let dim = SIDE * SIDE;
    let mut pixels = vec![0.0f32; n * dim];
    let labels: Vec<u8> = pixels
        .par_chunks_exact_mut(dim)
        .enumerate()
        .map(|(index, image)| {
            let params = ShapeParams::sample(seed, index as u64);
            params.render(image);
            params.shape.label()
        })
        .collect();
    Dataset::from_parts(pixels, dim, (SIDE, SIDE), Some(labels))
        .expect("n whole SIDE x SIDE images with n labels")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triangle_distance_is_zero_on_corners_and_negative_at_centre() {
        let r = 8.0;
        assert!(sd_equilateral_triangle((0.0, 0.0), r) < -3.9); // inradius r/2 = 4
        let top = sd_equilateral_triangle((0.0, r), r);
        assert!(top.abs() < 1e-4, "{top}");
        let (s, c) = (TAU as f32 / 3.0).sin_cos();
        let corner = (-s * r, c * r); // the top corner rotated by 120 degrees
        assert!(sd_equilateral_triangle(corner, r).abs() < 1e-4);
        assert!((sd_equilateral_triangle((0.0, r + 2.0), r) - 2.0).abs() < 1e-4);
    }

    #[test]
    fn box_distance() {
        assert_eq!(sd_box((0.0, 0.0), (2.0, 1.0)), -1.0);
        assert_eq!(sd_box((5.0, 0.0), (2.0, 1.0)), 3.0);
        assert_eq!(sd_box((5.0, 5.0), (2.0, 1.0)), 5.0);
    }

    #[test]
    fn shapes_stay_inside_the_image() {
        for index in 0..2000 {
            let params = ShapeParams::sample(3, index);
            let mut image = vec![0.0; SIDE * SIDE];
            params.render(&mut image);
            let border =
                (0..SIDE).flat_map(|i| [i, (SIDE - 1) * SIDE + i, i * SIDE, i * SIDE + SIDE - 1]);
            for i in border {
                assert_eq!(
                    image[i], 0.0,
                    "example {index} ({params:?}) touches the border"
                );
            }
        }
    }
}
