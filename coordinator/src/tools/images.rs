//! Image grids: tiles of `[height, width]` pixels in [0, 1] laid out in rows and columns,
//! upscaled (nearest neighbour: 2x, more for tiles under 14 pixels a side, see [`scale_for`]) and
//! separated by padding, written as 8-bit grey PNG.
//!
//! ```text
//! width  = cols * tile_width  * scale + (cols + 1) * pad
//! height = rows * tile_height * scale + (rows + 1) * pad
//! ```
//!
//! Tile `i` sits in row `i / cols`, column `i % cols`. Padding is mid-grey so the black
//! background of a tile stays distinguishable from the gap around it.

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, GrayImage, ImageFormat, Luma};

use crate::error::{Error, Result};

/// Upscaling of each pixel: a 28 x 28 tile becomes 56 x 56, visible without zooming.
pub const SCALE: u32 = 2;
/// Smaller tiles are upscaled further, until their shorter side is at least this many pixels
/// (an 8 x 8 tile becomes 32 x 32).
pub const MIN_TILE_SIDE: u32 = 28;

/// The nearest-neighbour upscaling factor of a `(height, width)` tile: [`SCALE`], or more for
/// tiles with a side under [`MIN_TILE_SIDE`] / 2 pixels: `ceil(MIN_TILE_SIDE / shorter side)`.
pub fn scale_for((height, width): (usize, usize)) -> u32 {
    let side = height.min(width).clamp(1, MIN_TILE_SIDE as usize) as u32;
    SCALE.max(MIN_TILE_SIDE.div_ceil(side))
}
/// Pixels of padding between tiles and around the grid (after scaling).
pub const PAD: u32 = 2;
/// Grey level of the padding.
pub const PAD_LEVEL: u8 = 128;

/// Where the tiles of a grid go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GridLayout {
    pub rows: usize,
    pub cols: usize,
    /// `(height, width)` of one tile in source pixels.
    pub tile: (usize, usize),
    pub scale: u32,
    pub pad: u32,
}

impl GridLayout {
    /// `rows x cols` tiles of `tile = (height, width)` pixels, scaled by [`scale_for`], with the
    /// default padding.
    pub fn new(rows: usize, cols: usize, tile: (usize, usize)) -> Self {
        GridLayout {
            rows,
            cols,
            tile,
            scale: scale_for(tile),
            pad: PAD,
        }
    }

    /// A near-square grid for `n` tiles: `ceil(sqrt(n))` columns.
    pub fn square(n: usize, tile: (usize, usize)) -> Self {
        let cols = n.max(1).isqrt() + usize::from(n.max(1).isqrt().pow(2) < n);
        Self::with_cols(n, cols, tile)
    }

    /// `n` tiles in rows of `cols` (the last row may be partly empty).
    pub fn with_cols(n: usize, cols: usize, tile: (usize, usize)) -> Self {
        let cols = cols.clamp(1, n.max(1));
        Self::new(n.max(1).div_ceil(cols), cols, tile)
    }

    /// `(width, height)` of the whole image in pixels.
    pub fn size(&self) -> (u32, u32) {
        let span = |count: usize, tile: usize| {
            count as u32 * tile as u32 * self.scale + (count as u32 + 1) * self.pad
        };
        (span(self.cols, self.tile.1), span(self.rows, self.tile.0))
    }

    /// Top-left corner of tile `index`.
    pub fn origin(&self, index: usize) -> (u32, u32) {
        let (row, col) = ((index / self.cols) as u32, (index % self.cols) as u32);
        let (th, tw) = (
            self.tile.0 as u32 * self.scale,
            self.tile.1 as u32 * self.scale,
        );
        (
            self.pad + col * (tw + self.pad),
            self.pad + row * (th + self.pad),
        )
    }

    /// Draws `tiles` (each `height * width` values, row-major, 0 = black, 1 = white; values
    /// outside [0, 1] are clamped) in order. Fails if a tile has the wrong size or there are more
    /// tiles than cells.
    pub fn render<'a>(&self, tiles: impl IntoIterator<Item = &'a [f32]>) -> Result<GrayImage> {
        let (width, height) = self.size();
        let mut img = GrayImage::from_pixel(width, height, Luma([PAD_LEVEL]));
        let (th, tw) = self.tile;
        for (index, tile) in tiles.into_iter().enumerate() {
            if index >= self.rows * self.cols {
                return Err(Error::Config(format!(
                    "more tiles than the {} x {} grid holds",
                    self.rows, self.cols
                )));
            }
            if tile.len() != th * tw {
                return Err(Error::Config(format!(
                    "tile {index} has {} pixels, a {th} x {tw} image has {}",
                    tile.len(),
                    th * tw
                )));
            }
            let (x0, y0) = self.origin(index);
            for (y, row) in tile.chunks_exact(tw).enumerate() {
                for (x, &v) in row.iter().enumerate() {
                    let level = Luma([to_level(v)]);
                    for dy in 0..self.scale {
                        for dx in 0..self.scale {
                            img.put_pixel(
                                x0 + x as u32 * self.scale + dx,
                                y0 + y as u32 * self.scale + dy,
                                level,
                            );
                        }
                    }
                }
            }
        }
        Ok(img)
    }
}

/// A value in [0, 1] as an 8-bit grey level (NaN shows black).
fn to_level(v: f32) -> u8 {
    if v.is_nan() {
        return 0;
    }
    (v.clamp(0.0, 1.0) * 255.0).round() as u8
}

/// Encodes `img` as PNG and writes it atomically to `path`.
pub fn save_png(path: &Path, img: impl Into<DynamicImage>) -> Result<()> {
    let mut bytes = Vec::new();
    img.into()
        .write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
        .map_err(|e| Error::Io(format!("cannot encode {} as PNG: {e}", path.display())))?;
    common::formats::write_atomic(path, &bytes).map_err(Error::from)
}

/// `(height, width)` of an image, as `--shape HxW` spells it (`28x28`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageShape {
    pub height: usize,
    pub width: usize,
}

impl std::str::FromStr for ImageShape {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not an image shape: use HEIGHTxWIDTH, e.g. 28x28");
        let (h, w) = s.split_once(['x', 'X']).ok_or_else(bad)?;
        let height: usize = h.trim().parse().map_err(|_| bad())?;
        let width: usize = w.trim().parse().map_err(|_| bad())?;
        if height == 0 || width == 0 {
            return Err(bad());
        }
        Ok(ImageShape { height, width })
    }
}

/// The tile shape for a model with `input_dim` pixels: `--shape` if given (it must multiply out
/// to `input_dim`), else the square root of `input_dim` when it is a perfect square.
pub fn tile_shape(input_dim: usize, shape: Option<ImageShape>) -> Result<(usize, usize)> {
    match shape {
        Some(ImageShape { height, width }) if height * width == input_dim => Ok((height, width)),
        Some(ImageShape { height, width }) => Err(Error::Config(format!(
            "--shape {height}x{width} has {} pixels but the model's images have {input_dim}",
            height * width
        ))),
        None => {
            let side = input_dim.isqrt();
            if side * side == input_dim {
                Ok((side, side))
            } else {
                Err(Error::Config(format!(
                    "the model's images have {input_dim} pixels, not a square number: give their \
                     shape with --shape HEIGHTxWIDTH"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_sizes_and_origins() {
        let g = GridLayout {
            scale: SCALE,
            ..GridLayout::square(10, (3, 2))
        };
        assert_eq!((g.rows, g.cols), (3, 4));
        assert_eq!(g.size(), (4 * 4 + 5 * 2, 3 * 6 + 4 * 2));
        assert_eq!(g.origin(0), (2, 2));
        assert_eq!(g.origin(5), (2 + 4 + 2, 2 + 6 + 2));
        assert_eq!(GridLayout::square(64, (28, 28)).cols, 8);
        assert_eq!(GridLayout::square(1, (28, 28)).cols, 1);
        assert_eq!(GridLayout::with_cols(3, 8, (1, 1)).cols, 3);
    }

    #[test]
    fn small_tiles_are_scaled_up_to_at_least_28_pixels_a_side() {
        assert_eq!(scale_for((28, 28)), SCALE);
        assert_eq!(scale_for((14, 14)), SCALE);
        assert_eq!(scale_for((13, 13)), 3);
        assert_eq!(scale_for((8, 8)), 4);
        assert_eq!(scale_for((3, 4)), 10);
        assert_eq!(scale_for((1, 1)), 28);
        assert_eq!(scale_for((100, 100)), SCALE);
        // An 8 x 8 tile becomes 32 x 32, each source pixel a 4 x 4 block.
        let tile: Vec<f32> = (0..64).map(|i| i as f32 / 63.0).collect();
        let g = GridLayout::new(1, 1, (8, 8));
        let img = g.render([&tile[..]]).unwrap();
        assert_eq!(img.dimensions(), (32 + 2 * PAD, 32 + 2 * PAD));
        for y in 0..32 {
            for x in 0..32 {
                let source = tile[(y / 4 * 8 + x / 4) as usize];
                assert_eq!(
                    img.get_pixel(PAD + x, PAD + y).0,
                    [to_level(source)],
                    "pixel ({x}, {y})"
                );
            }
        }
    }

    #[test]
    fn render_scales_tiles_and_pads() {
        let g = GridLayout {
            scale: SCALE,
            ..GridLayout::new(1, 2, (1, 2))
        };
        let img = g.render([&[0.0, 1.0][..], &[0.5, 2.0][..]]).unwrap();
        assert_eq!(img.dimensions(), (2 * 4 + 3 * 2, 2 + 2 * 2));
        assert_eq!(img.get_pixel(0, 0).0, [PAD_LEVEL]);
        assert_eq!(img.get_pixel(2, 2).0, [0]);
        assert_eq!(img.get_pixel(3, 3).0, [0]);
        assert_eq!(img.get_pixel(4, 2).0, [255]);
        assert_eq!(img.get_pixel(8, 2).0, [128]);
        assert_eq!(img.get_pixel(10, 3).0, [255]);
        assert!(g.render([&[0.0][..]]).is_err());
        assert!(g.render([&[0.0, 0.0][..]; 3]).is_err());
    }

    #[test]
    fn shapes_parse_and_check() {
        assert_eq!(
            "28x28".parse::<ImageShape>(),
            Ok(ImageShape {
                height: 28,
                width: 28
            })
        );
        assert!("28".parse::<ImageShape>().is_err());
        assert!("0x3".parse::<ImageShape>().is_err());
        assert_eq!(tile_shape(784, None).unwrap(), (28, 28));
        assert!(tile_shape(12, None).is_err());
        let shape = "3x4".parse().ok();
        assert_eq!(tile_shape(12, shape).unwrap(), (3, 4));
        assert!(tile_shape(13, shape).is_err());
    }
}
