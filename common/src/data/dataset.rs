//! [`Dataset`]: n images of one shape, as f32 pixels in a row-major `[n, D]` matrix.

use std::fmt;
use std::ops::Range;

use ndarray::ArrayView2;

use crate::model::Likelihood;
use crate::{Error, Result};

/// `n` examples of `D = height * width` pixels each, stored row-major as `[n, D]` f32, with
/// optional class labels (used only for reporting and plots, never for training).
#[derive(Clone)]
pub struct Dataset {
    /// `[n, D]` row-major, one image per row, each image row-major `[height, width]`.
    pixels: Vec<f32>,
    dim: usize,
    height: usize,
    width: usize,
    /// One label per example when the source has them (`labels.len() == len()`).
    pub labels: Option<Vec<u8>>,
}

impl Dataset {
    /// Builds a dataset from `n * dim` pixels (row-major `[n, dim]`) of images of `height x width
    /// = dim` pixels, with `n` labels if any. Errors if the sizes disagree or there are no examples.
    pub fn from_parts(
        pixels: Vec<f32>,
        dim: usize,
        (height, width): (usize, usize),
        labels: Option<Vec<u8>>,
    ) -> Result<Self> {
        if dim == 0 || height.checked_mul(width) != Some(dim) {
            return Err(Error::DataMismatch(format!(
                "an image of {height} x {width} pixels does not have dimension {dim}"
            )));
        }
        if pixels.is_empty() || !pixels.len().is_multiple_of(dim) {
            return Err(Error::DataMismatch(format!(
                "{} pixel values are not a positive whole number of {dim}-pixel images",
                pixels.len()
            )));
        }
        let n = pixels.len() / dim;
        if let Some(labels) = &labels
            && labels.len() != n
        {
            return Err(Error::DataMismatch(format!(
                "{} labels for {n} images: need one label per image",
                labels.len()
            )));
        }
        Ok(Dataset {
            pixels,
            dim,
            height,
            width,
            labels,
        })
    }

    /// Number of examples `n`.
    pub fn len(&self) -> usize {
        self.pixels.len() / self.dim
    }

    /// Always false: a dataset has at least one example.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pixels per example, `D = height * width`.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// `(height, width)` of one image.
    pub fn image_shape(&self) -> (usize, usize) {
        (self.height, self.width)
    }

    /// All pixels, `[n, D]`, in standard (row-major, contiguous) layout.
    pub fn pixels(&self) -> ArrayView2<'_, f32> {
        self.rows(0..self.len())
    }

    /// Examples `range`, `[range.len(), D]`, contiguous. Panics if the range is out of bounds,
    /// like slice indexing.
    pub fn rows(&self, range: Range<usize>) -> ArrayView2<'_, f32> {
        let rows = range.len();
        ArrayView2::from_shape((rows, self.dim), self.row_values(range))
            .expect("a whole number of rows is always a valid [rows, dim] matrix")
    }

    /// Examples `range` as one slice of `range.len() * D` values, row after row. Panics if the
    /// range is out of bounds, like slice indexing.
    pub fn row_values(&self, range: Range<usize>) -> &[f32] {
        &self.pixels[range.start * self.dim..range.end * self.dim]
    }

    /// Splits off the last `holdout` examples as the held-out set: returns `(train, held_out)`.
    /// Both must be non-empty.
    pub fn split_holdout(self, holdout: usize) -> Result<(Dataset, Dataset)> {
        let n = self.len();
        if holdout == 0 {
            return Err(Error::Config(
                "holdout must be at least 1 example: the held-out set is what the ELBO is \
                 evaluated on"
                    .into(),
            ));
        }
        if holdout >= n {
            return Err(Error::Config(format!(
                "holdout of {holdout} examples leaves nothing to train on: the dataset has only \
                 {n} examples; use a holdout below {n}"
            )));
        }
        let n_train = n - holdout;
        let (height, width) = self.image_shape();
        let (train_labels, test_labels) = match self.labels {
            Some(mut labels) => {
                let tail = labels.split_off(n_train);
                (Some(labels), Some(tail))
            }
            None => (None, None),
        };
        let mut pixels = self.pixels;
        let test_pixels = pixels.split_off(n_train * self.dim);
        let part = |pixels, labels| Dataset {
            pixels,
            dim: self.dim,
            height,
            width,
            labels,
        };
        Ok((part(pixels, train_labels), part(test_pixels, test_labels)))
    }

    /// Checks that the data suits a model with `input_dim` inputs and the given observation model:
    /// the dimension matches, every value is finite, and for `bernoulli` every value is in [0, 1].
    pub fn check_fits(&self, likelihood: &Likelihood, input_dim: usize) -> Result<()> {
        let (h, w) = self.image_shape();
        if self.dim() != input_dim {
            return Err(Error::DataMismatch(format!(
                "the data has {} values per example ({h} x {w} images) but the model's input \
                 dimension is {input_dim}",
                self.dim()
            )));
        }
        let range = ValueRange::of(&self.pixels, self.dim);
        if let Some(example) = range.first_non_finite {
            return Err(Error::DataMismatch(format!(
                "example {example} contains a NaN or infinite pixel value"
            )));
        }
        if matches!(likelihood, Likelihood::Bernoulli) && (range.min < 0.0 || range.max > 1.0) {
            return Err(Error::DataMismatch(format!(
                "the bernoulli likelihood needs every pixel value in [0, 1], but the values range \
                 from {} to {}; rescale the data to [0, 1] or use the gaussian likelihood",
                range.min, range.max
            )));
        }
        Ok(())
    }

    /// Appends `other`'s examples after this dataset's (same image shape; labels kept only if
    /// both have them). (MNIST's training and test files make one dataset.)
    #[cfg(any(test, feature = "download"))]
    pub(crate) fn concat(self, other: Dataset) -> Result<Dataset> {
        if self.image_shape() != other.image_shape() {
            return Err(Error::DataMismatch(format!(
                "cannot join {:?} images with {:?} images",
                self.image_shape(),
                other.image_shape()
            )));
        }
        let labels = match (self.labels, other.labels) {
            (Some(mut a), Some(b)) => {
                a.extend_from_slice(&b);
                Some(a)
            }
            _ => None,
        };
        let (dim, shape) = (self.dim, (self.height, self.width));
        let mut pixels = self.pixels;
        pixels.extend_from_slice(&other.pixels);
        Dataset::from_parts(pixels, dim, shape, labels)
    }
}

impl fmt::Debug for Dataset {
    /// A summary, not the pixels.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dataset")
            .field("len", &self.len())
            .field("image_shape", &self.image_shape())
            .field("labelled", &self.labels.is_some())
            .finish()
    }
}

/// Minimum and maximum of a pixel buffer, and the first example holding a non-finite value.
struct ValueRange {
    min: f32,
    max: f32,
    first_non_finite: Option<usize>,
}

impl ValueRange {
    fn of(pixels: &[f32], dim: usize) -> Self {
        let mut range = ValueRange {
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            first_non_finite: None,
        };
        for (example, row) in pixels.chunks(dim).enumerate() {
            for &v in row {
                range.min = range.min.min(v);
                range.max = range.max.max(v);
            }
            if range.first_non_finite.is_none() && !row.iter().all(|v| v.is_finite()) {
                range.first_non_finite = Some(example);
            }
        }
        range
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(n: usize) -> Dataset {
        // 2 x 3 images; pixel value = example index / n, so rows are distinguishable.
        let pixels = (0..n * 6).map(|i| (i / 6) as f32 / n as f32).collect();
        Dataset::from_parts(pixels, 6, (2, 3), Some((0..n as u8).collect())).unwrap()
    }

    #[test]
    fn from_parts_rejects_inconsistent_sizes() {
        assert!(Dataset::from_parts(vec![0.0; 12], 6, (2, 2), None).is_err());
        assert!(Dataset::from_parts(vec![0.0; 13], 6, (2, 3), None).is_err());
        assert!(Dataset::from_parts(vec![], 6, (2, 3), None).is_err());
        assert!(Dataset::from_parts(vec![0.0; 12], 6, (2, 3), Some(vec![1])).is_err());
        let d = Dataset::from_parts(vec![0.0; 12], 6, (2, 3), Some(vec![1, 2])).unwrap();
        assert_eq!((d.len(), d.dim(), d.image_shape()), (2, 6, (2, 3)));
    }

    #[test]
    fn split_keeps_the_tail_as_held_out() {
        let (train, test) = tiny(10).split_holdout(3).unwrap();
        assert_eq!((train.len(), test.len()), (7, 3));
        assert_eq!(train.labels.as_deref(), Some(&[0, 1, 2, 3, 4, 5, 6][..]));
        assert_eq!(test.labels.as_deref(), Some(&[7, 8, 9][..]));
        assert_eq!(test.pixels()[[0, 0]], 0.7);
        assert_eq!(train.pixels()[[6, 5]], 0.6);
        assert!(train.pixels().is_standard_layout() && test.pixels().is_standard_layout());
        assert_eq!(train.rows(2..4).as_slice().unwrap().len(), 12);
    }

    #[test]
    fn split_rejects_empty_sides_and_names_the_numbers() {
        assert!(tiny(5).split_holdout(0).is_err());
        let msg = tiny(5).split_holdout(5).unwrap_err().to_string();
        assert!(
            msg.contains('5') && msg.contains("only 5 examples"),
            "{msg}"
        );
    }

    #[test]
    fn concat_appends_rows_and_labels() {
        let joined = tiny(2).concat(tiny(3)).unwrap();
        assert_eq!(joined.len(), 5);
        assert_eq!(joined.labels.as_deref(), Some(&[0, 1, 0, 1, 2][..]));
        assert_eq!(joined.pixels()[[4, 0]], 2.0 / 3.0);
    }
}
