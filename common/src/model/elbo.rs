//! The ELBO of a batch and its gradient, by hand-written backpropagation (docs/design.md §1).
//!
//! Model (sizes from [`ModelConfig`], tensors from [`ParamLayout`], every layer `y = x W^T + b`):
//!
//! ```text
//! encoder   h = relu(... relu(x W1^T + b1) ...)          x: [n, D], h: [n, H]
//!           mu = h Wmu^T + bmu,  lv = h Wlv^T + blv        [n, Z]
//! reparam   z[i*K + k] = mu[i] + exp(lv[i] / 2) * eps[i*K + k]     [n*K, Z]
//! decoder   g = relu(... relu(z V1^T + c1) ...),  f = g Wout^T + bout    [n*K, D]
//! ELBO_i    = (1/K) sum_k log p(x_i | f[i*K + k]) - KL_i
//! KL_i      = 1/2 sum_j (mu_ij^2 + sigma_ij^2 - lv_ij - 1)
//! ```
//!
//! with `log p(x|f) = sum_d x_d f_d - softplus(f_d)` (Bernoulli, `f` are logits) or
//! `-D/2 ln(2 pi c) - |x - f|^2 / (2c)` (Gaussian with variance `c`).
//!
//! The loss is `L = -sum_i ELBO_i` and the backward pass, with `eps` held fixed:
//!
//! ```text
//! dL/df          = (sigmoid(f) - x) / K            (Bernoulli)    (f - x) / (c K)   (Gaussian)
//! dL/dW, dL/db   = delta^T input, colsum(delta)    for each linear layer, delta = dL/d(output)
//! dL/dinput      = delta W,   masked by relu'(pre-activation) = [post-activation > 0]
//! dL/dmu_i       = sum_k dL/dz[i*K+k] + mu_i                      (KL: dKL/dmu = mu)
//! dL/dlv_i       = sigma_i/2 sum_k dL/dz[i*K+k] eps[i*K+k] + (sigma_i^2 - 1)/2
//! dL/dh          = dL/dmu Wmu + dL/dlv Wlv
//! ```
//!
//! Sums over examples run in example order within a shard and along the reduction tree across
//! shards ([`Vae::elbo_grad_tree`]); every kernel is deterministic for any thread count
//! ([`crate::kernels`]). So a batch's gradient is a pure function of its inputs and its shards.

use std::sync::Mutex;

use ndarray::{ArrayView2, CowArray, Ix2};

use super::stacked::{ShardRows, StackedShards};
use crate::kernels::{
    Float, add_bias_act, colsum_into, for_row_pieces, gemm, output_row, relu_mask, sized,
    tree_weight_grad, view, view_mut, with_widest_vectors,
};
use crate::model::{
    BatchStats, LayerRole, Likelihood, LinearLayout, ModelConfig, ParamLayout, model_name,
};
use crate::train::Node;
use crate::{Error, Result};

/// Reusable buffers for one batch at a time: keep one per thread of work to avoid allocating in
/// the training loop. Sizes grow to the largest batch seen and stay.
#[derive(Default)]
pub struct Workspace<T> {
    /// Post-ReLU encoder hidden activations, `[n, H_l]` each.
    enc: Vec<Vec<T>>,
    /// `[n, Z]` each.
    mu: Vec<T>,
    logvar: Vec<T>,
    sigma: Vec<T>,
    /// `[n*K, Z]`.
    z: Vec<T>,
    /// Post-ReLU decoder hidden activations, `[n*K, H_l]` each.
    dec: Vec<Vec<T>>,
    /// `[n*K, D]`: decoder outputs, overwritten with `dL/df` when a gradient is wanted.
    out: Vec<T>,
    /// `log p(x_i | z_r)` per decoder row, `[n*K]`.
    row_loglik: Vec<f64>,
    /// `KL_i` per example, `[n]`.
    row_kl: Vec<f64>,
    /// Backward ping-pong buffers for `dL/d(activation)`.
    grad_a: Vec<T>,
    grad_b: Vec<T>,
    /// `[n, Z]` each.
    dmu: Vec<T>,
    dlogvar: Vec<T>,
    /// Noise `[n*K, Z]`, for callers that generate it in place ([`Engine`](crate::train::Engine)).
    pub(crate) eps: Vec<T>,
    /// Scratch for per-layer partial sums along the reduction tree.
    tree_bufs: Mutex<Vec<Vec<T>>>,
}

impl<T> std::fmt::Debug for Workspace<T> {
    /// Sizes only: the buffers hold megabytes of floats.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let floats = self
            .enc
            .iter()
            .chain(&self.dec)
            .map(Vec::len)
            .sum::<usize>()
            + [
                &self.mu,
                &self.logvar,
                &self.sigma,
                &self.z,
                &self.out,
                &self.grad_a,
                &self.grad_b,
                &self.dmu,
                &self.dlogvar,
                &self.eps,
            ]
            .iter()
            .map(|v| v.len())
            .sum::<usize>();
        f.debug_struct("Workspace")
            .field("examples", &self.row_kl.len())
            .field("decoder_rows", &self.row_loglik.len())
            .field("buffered_values", &floats)
            .finish()
    }
}

impl<T: Float> Workspace<T> {
    pub fn new() -> Self {
        Workspace {
            enc: Vec::new(),
            mu: Vec::new(),
            logvar: Vec::new(),
            sigma: Vec::new(),
            z: Vec::new(),
            dec: Vec::new(),
            out: Vec::new(),
            row_loglik: Vec::new(),
            row_kl: Vec::new(),
            grad_a: Vec::new(),
            grad_b: Vec::new(),
            dmu: Vec::new(),
            dlogvar: Vec::new(),
            eps: Vec::new(),
            tree_bufs: Mutex::new(Vec::new()),
        }
    }

    /// `log p(x_i | z_r)` for each decoder row `r = i*K + k` of the last forward pass.
    pub fn row_loglik(&self) -> &[f64] {
        &self.row_loglik
    }

    /// `KL_i` for each example of the last forward pass.
    pub fn row_kl(&self) -> &[f64] {
        &self.row_kl
    }

    /// The encoder's `mu` and `logvar` rows (`[n, Z]`, row-major) of the last forward pass.
    pub fn posterior(&self) -> (&[T], &[T]) {
        (&self.mu, &self.logvar)
    }

    /// The latent samples `z` (`[n*K, Z]`) of the last forward pass.
    pub fn latents(&self) -> &[T] {
        &self.z
    }
}

/// `W` of a layer as an `[out, in]` view into the flat vector.
fn weight<'a, T>(params: &'a [T], layer: &LinearLayout) -> ArrayView2<'a, T> {
    view(&params[layer.weight.clone()], layer.out_dim, layer.in_dim)
}

/// A VAE's shape: configuration and parameter layout. Stateless; parameters are passed in.
#[derive(Debug, Clone, PartialEq)]
pub struct Vae {
    config: ModelConfig,
    layout: ParamLayout,
}

impl Vae {
    /// Validates the configuration.
    pub fn new(config: ModelConfig) -> Result<Self> {
        config.validate()?;
        let layout = ParamLayout::new(&config);
        Ok(Vae { config, layout })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    /// Checks that `params` has one value per parameter of the model.
    pub fn check_params<T>(&self, params: &[T]) -> Result<()> {
        if params.len() != self.layout.len() {
            return Err(Error::Tensor(format!(
                "parameter vector has {} values, the {} model has {}",
                params.len(),
                model_name(&self.config),
                self.layout.len()
            )));
        }
        Ok(())
    }

    /// Checks parameter length, input width and the noise shape; returns K (samples per example).
    fn check<T: Float>(
        &self,
        params: &[T],
        x: &ArrayView2<T>,
        eps: &ArrayView2<T>,
    ) -> Result<usize> {
        self.check_params(params)?;
        if x.ncols() != self.config.input_dim {
            return Err(Error::DataMismatch(format!(
                "batch has {} columns per example, the model's input dimension is {}",
                x.ncols(),
                self.config.input_dim
            )));
        }
        let n = x.nrows();
        let z = self.config.latent;
        if eps.ncols() != z || (n == 0 && eps.nrows() != 0) {
            return Err(Error::Tensor(format!(
                "noise has shape {:?}, expected [examples * samples, {z}]",
                eps.dim()
            )));
        }
        if n == 0 {
            return Ok(1);
        }
        if eps.nrows() == 0 || !eps.nrows().is_multiple_of(n) {
            return Err(Error::Tensor(format!(
                "noise has {} rows for {n} examples: expected a positive multiple (examples * samples)",
                eps.nrows()
            )));
        }
        Ok(eps.nrows() / n)
    }

    /// The ELBO of a batch with the noise `eps: [n*K, Z]` (row `i*K + k` is sample `k` of
    /// example `i`), without gradients.
    pub fn elbo<T: Float>(
        &self,
        params: &[T],
        x: ArrayView2<T>,
        eps: ArrayView2<T>,
        ws: &mut Workspace<T>,
    ) -> Result<BatchStats> {
        let samples = self.check(params, &x, &eps)?;
        let x = x.as_standard_layout();
        let eps = eps.as_standard_layout();
        Ok(self.forward(params, &x, &eps, samples, ws, false))
    }

    /// The ELBO of a batch and `grad = d(-ELBO)/d(params)` summed over the batch (overwritten,
    /// not accumulated). `eps` as in [`Vae::elbo`].
    pub fn elbo_grad<T: Float>(
        &self,
        params: &[T],
        x: ArrayView2<T>,
        eps: ArrayView2<T>,
        grad: &mut [T],
        ws: &mut Workspace<T>,
    ) -> Result<BatchStats> {
        let n = x.nrows();
        self.elbo_grad_tree(params, x, eps, Node { lo: 0, hi: 1 }, &[n], grad, ws)
    }

    /// The gradient sum of a reduction-tree node whose shards' batches are stacked in `x`:
    /// `segments[i]` examples of shard `node.lo + i`, in shard order (any may be 0). The result
    /// is bit-identical to running [`Vae::elbo_grad`] on every shard alone and adding the
    /// results along the tree below `node` (`left += right`, as
    /// [`ReductionTree::evaluate`](crate::train::ReductionTree::evaluate) does), for the gradient and the sums alike.
    ///
    /// Faster, because the forward pass and the products that do not sum over examples run once
    /// on all rows (a product's row does not depend on the other rows; `linalg` tests this), and
    /// each layer's per-shard weight gradients are summed and added along the tree in one pass
    /// per output tile ([`tree_weight_grad`]), so `dW` is written once, not once per shard.
    #[allow(clippy::too_many_arguments)]
    pub fn elbo_grad_tree<T: Float>(
        &self,
        params: &[T],
        x: ArrayView2<T>,
        eps: ArrayView2<T>,
        node: Node,
        segments: &[usize],
        grad: &mut [T],
        ws: &mut Workspace<T>,
    ) -> Result<BatchStats> {
        let samples = self.check(params, &x, &eps)?;
        if node.is_empty()
            || segments.len() != node.len() as usize
            || segments.iter().sum::<usize>() != x.nrows()
        {
            return Err(Error::Tensor(format!(
                "{} segments of {} examples in all for shards {}..{} and a batch of {}",
                segments.len(),
                segments.iter().sum::<usize>(),
                node.lo,
                node.hi,
                x.nrows()
            )));
        }
        if grad.len() != params.len() {
            return Err(Error::Tensor(format!(
                "gradient buffer has {} values, the model has {}",
                grad.len(),
                params.len()
            )));
        }
        if x.nrows() == 0 {
            grad.fill(T::zero());
            return Ok(BatchStats::default());
        }
        let x = x.as_standard_layout();
        let eps = eps.as_standard_layout();
        self.forward(params, &x, &eps, samples, ws, true);
        let shards = StackedShards::new(node, segments, samples);
        let stats = shards.stats(&ws.row_loglik, &ws.row_kl, samples);
        self.backward(params, &x, &eps, samples, &shards, grad, ws);
        Ok(stats)
    }

    /// Forward pass: fills the workspace (per-row log-likelihoods and KLs) and returns the sums.
    /// With `want_grad`, leaves `dL/df` in `ws.out`.
    fn forward<T: Float>(
        &self,
        params: &[T],
        x: &CowArray<T, Ix2>,
        eps: &CowArray<T, Ix2>,
        samples: usize,
        ws: &mut Workspace<T>,
        want_grad: bool,
    ) -> BatchStats {
        let n = x.nrows();
        if n == 0 {
            ws.row_loglik.clear();
            ws.row_kl.clear();
            return BatchStats::default();
        }
        self.encode(params, x.view(), ws);
        self.reparameterise(eps.as_slice().expect("standard layout"), samples, ws);
        self.decode(params, x, samples, ws, want_grad);
        BatchStats::of_rows(&ws.row_loglik[..n * samples], &ws.row_kl, samples)
    }

    /// Encoder: hidden layers, both heads, sigma and the per-example KL.
    pub(crate) fn encode<T: Float>(&self, params: &[T], x: ArrayView2<T>, ws: &mut Workspace<T>) {
        let n = x.nrows();
        let z_dim = self.config.latent;
        let hidden: Vec<&LinearLayout> = self.layout.encoder_hidden().collect();
        if ws.enc.len() < hidden.len() {
            ws.enc.resize_with(hidden.len(), Vec::new);
        }
        for (l, layer) in hidden.iter().enumerate() {
            let (before, rest) = ws.enc.split_at_mut(l);
            let input = if l == 0 {
                x.view()
            } else {
                view(&before[l - 1], n, layer.in_dim)
            };
            let out = sized(&mut rest[0], n * layer.out_dim);
            linear(params, layer, input, out, true);
        }
        let h = match hidden.last() {
            Some(last) => view(&ws.enc[hidden.len() - 1], n, last.out_dim),
            None => x.view(),
        };
        let mu_layer = self.layout.layer(LayerRole::Mu);
        let lv_layer = self.layout.layer(LayerRole::LogVar);
        linear(
            params,
            mu_layer,
            h.view(),
            sized(&mut ws.mu, n * z_dim),
            false,
        );
        linear(params, lv_layer, h, sized(&mut ws.logvar, n * z_dim), false);

        let mu = &ws.mu[..n * z_dim];
        let logvar = &ws.logvar[..n * z_dim];
        let sigma = sized(&mut ws.sigma, n * z_dim);
        let row_kl = &mut ws.row_kl;
        row_kl.clear();
        let half = T::from_f64(0.5);
        for ((m, lv), s) in mu
            .chunks_exact(z_dim)
            .zip(logvar.chunks_exact(z_dim))
            .zip(sigma.chunks_exact_mut(z_dim))
        {
            let mut kl = 0.0f64;
            for ((&m, &lv), s) in m.iter().zip(lv).zip(s.iter_mut()) {
                *s = (lv * half).exp();
                let (m, lv, s) = (m.as_f64(), lv.as_f64(), s.as_f64());
                kl += m * m + s * s - lv - 1.0;
            }
            row_kl.push(0.5 * kl);
        }
    }

    /// `z[i*K + k] = mu[i] + sigma[i] * eps[i*K + k]`.
    pub(crate) fn reparameterise<T: Float>(
        &self,
        eps: &[T],
        samples: usize,
        ws: &mut Workspace<T>,
    ) {
        let z_dim = self.config.latent;
        let n = ws.row_kl.len();
        let z = sized(&mut ws.z, n * samples * z_dim);
        for (i, (zi, ei)) in z
            .chunks_exact_mut(samples * z_dim)
            .zip(eps.chunks_exact(samples * z_dim))
            .enumerate()
        {
            let mu = &ws.mu[i * z_dim..(i + 1) * z_dim];
            let sigma = &ws.sigma[i * z_dim..(i + 1) * z_dim];
            for (zr, er) in zi.chunks_exact_mut(z_dim).zip(ei.chunks_exact(z_dim)) {
                for (((z, &e), &m), &s) in zr.iter_mut().zip(er).zip(mu).zip(sigma) {
                    *z = m + s * e;
                }
            }
        }
    }

    /// Decoder and observation model on `ws.z` (`[n*K, Z]`, decoder row `r` belongs to example
    /// `r / samples`): fills `ws.row_loglik`, and with `want_grad` leaves `dL/df` in `ws.out`.
    pub(crate) fn decode<T: Float>(
        &self,
        params: &[T],
        x: &CowArray<T, Ix2>,
        samples: usize,
        ws: &mut Workspace<T>,
        want_grad: bool,
    ) {
        let rows = x.nrows() * samples;
        let d = self.config.input_dim;
        let hidden: Vec<&LinearLayout> = self.layout.decoder_hidden().collect();
        if ws.dec.len() < hidden.len() {
            ws.dec.resize_with(hidden.len(), Vec::new);
        }
        let z_view = view(&ws.z, rows, self.config.latent);
        for (l, layer) in hidden.iter().enumerate() {
            let (before, rest) = ws.dec.split_at_mut(l);
            let input = if l == 0 {
                z_view.view()
            } else {
                view(&before[l - 1], rows, layer.in_dim)
            };
            linear(
                params,
                layer,
                input,
                sized(&mut rest[0], rows * layer.out_dim),
                true,
            );
        }
        let out_layer = self.layout.layer(LayerRole::DecoderOut);
        let g = match hidden.last() {
            Some(last) => view(&ws.dec[hidden.len() - 1], rows, last.out_dim),
            None => z_view,
        };
        let out = sized(&mut ws.out, rows * d);
        gemm(
            T::one(),
            g,
            weight(params, out_layer).t(),
            T::zero(),
            view_mut(out, rows, d),
        );
        let bias = &params[out_layer.bias.clone()];
        let x = x.as_slice().expect("standard layout");
        let row_loglik = sized(&mut ws.row_loglik, rows);
        let inv_k = T::from_f64(1.0 / samples as f64);
        match self.config.likelihood {
            Likelihood::Bernoulli => {
                // term = x f - softplus(f);  dL/df = (sigmoid(f) - x) / K
                let term = |f: T, xv: T| {
                    let (sp, s) = T::softplus_sigmoid(f);
                    (xv * f - sp, (s - xv) * inv_k)
                };
                for_row_pieces(out, d, row_loglik, |r0, block, lls| {
                    let mut terms = vec![T::zero(); d];
                    // Division, polynomials and sums per value: worth the CPU's widest vectors.
                    with_widest_vectors(
                        #[inline(always)]
                        || {
                            for (j, (row, ll)) in block.chunks_exact_mut(d).zip(lls).enumerate() {
                                let xr = &x[(r0 + j) / samples * d..][..d];
                                *ll = if want_grad {
                                    output_row::<T, true>(row, xr, bias, &mut terms, term)
                                } else {
                                    output_row::<T, false>(row, xr, bias, &mut terms, term)
                                };
                            }
                        },
                    );
                });
            }
            Likelihood::Gaussian { variance } => {
                // term = (f - x)^2;  dL/df = (f - x) / (c K);
                // log p = -D/2 ln(2 pi c) - sum (f - x)^2 / (2c)
                let scale = T::from_f64(1.0 / (variance * samples as f64));
                let constant = -0.5 * d as f64 * (2.0 * std::f64::consts::PI * variance).ln();
                let term = |f: T, xv: T| {
                    let diff = f - xv;
                    (diff * diff, diff * scale)
                };
                for_row_pieces(out, d, row_loglik, |r0, block, lls| {
                    let mut terms = vec![T::zero(); d];
                    for (j, (row, ll)) in block.chunks_exact_mut(d).zip(lls).enumerate() {
                        let xr = &x[(r0 + j) / samples * d..][..d];
                        let sq = if want_grad {
                            output_row::<T, true>(row, xr, bias, &mut terms, term)
                        } else {
                            output_row::<T, false>(row, xr, bias, &mut terms, term)
                        };
                        *ll = constant - sq / (2.0 * variance);
                    }
                });
            }
        }
    }

    /// Backward pass after `forward(.., want_grad = true)`: overwrites `grad` with the node's
    /// gradient sum (per-shard contributions added along `tree`).
    #[allow(clippy::too_many_arguments)]
    fn backward<T: Float>(
        &self,
        params: &[T],
        x: &CowArray<T, Ix2>,
        eps: &CowArray<T, Ix2>,
        samples: usize,
        shards: &StackedShards,
        grad: &mut [T],
        ws: &mut Workspace<T>,
    ) {
        let n = x.nrows();
        let rows = n * samples;
        let z_dim = self.config.latent;
        let Workspace {
            enc,
            mu,
            sigma,
            z,
            dec,
            out,
            grad_a,
            grad_b,
            dmu,
            dlogvar,
            tree_bufs,
            ..
        } = ws;
        // Row ranges of the shards: encoder rows are examples, decoder rows examples x K.
        let (enc_rows, dec_rows) = (
            shards.encoder_rows(tree_bufs),
            shards.decoder_rows(tree_bufs),
        );

        // Output layer: delta = dL/df, [rows, D].
        let out_layer = self.layout.layer(LayerRole::DecoderOut);
        let dec_hidden: Vec<&LinearLayout> = self.layout.decoder_hidden().collect();
        let delta = &out[..rows * out_layer.out_dim];
        let out_input = match dec_hidden.last() {
            Some(last) => view(&dec[dec_hidden.len() - 1], rows, last.out_dim),
            None => view(z, rows, z_dim),
        };
        let d_in = sized(grad_a, rows * out_layer.in_dim);
        layer_backward(
            params,
            out_layer,
            delta,
            out_input,
            &dec_rows,
            Some(d_in),
            grad,
        );

        // Decoder hidden layers, last to first: grad_a holds dL/d(post-activation).
        for (l, layer) in dec_hidden.iter().enumerate().rev() {
            let act = &dec[l][..rows * layer.out_dim];
            let delta = &mut grad_a[..rows * layer.out_dim];
            relu_mask(delta, act);
            let input = if l == 0 {
                view(z, rows, z_dim)
            } else {
                view(&dec[l - 1], rows, layer.in_dim)
            };
            let d_in = sized(grad_b, rows * layer.in_dim);
            layer_backward(params, layer, delta, input, &dec_rows, Some(d_in), grad);
            std::mem::swap(grad_a, grad_b);
        }

        // Reparameterisation and KL: grad_a holds dL/dz, [rows, Z].
        let dz = &grad_a[..rows * z_dim];
        let eps = eps.as_slice().expect("standard layout");
        let dmu = sized(dmu, n * z_dim);
        let dlv = sized(dlogvar, n * z_dim);
        let half = T::from_f64(0.5);
        for i in 0..n {
            let block = i * samples * z_dim..(i + 1) * samples * z_dim;
            let (dz_i, eps_i) = (&dz[block.clone()], &eps[block]);
            for j in 0..z_dim {
                let at = i * z_dim + j;
                let (m, s) = (mu[at], sigma[at]);
                let mut sum_dz = T::zero();
                let mut sum_dz_eps = T::zero();
                for k in 0..samples {
                    let g = dz_i[k * z_dim + j];
                    sum_dz = sum_dz + g;
                    sum_dz_eps = sum_dz_eps + g * eps_i[k * z_dim + j];
                }
                dmu[at] = sum_dz + m;
                dlv[at] = half * s * sum_dz_eps + half * (s * s - T::one());
            }
        }

        // Heads: dL/dh = dmu Wmu + dlv Wlv (only needed when there is an encoder hidden layer).
        let enc_hidden: Vec<&LinearLayout> = self.layout.encoder_hidden().collect();
        let h = match enc_hidden.last() {
            Some(last) => view(&enc[enc_hidden.len() - 1], n, last.out_dim),
            None => x.view(),
        };
        let mu_layer = self.layout.layer(LayerRole::Mu);
        let lv_layer = self.layout.layer(LayerRole::LogVar);
        let dh = (!enc_hidden.is_empty()).then(|| sized(grad_a, n * mu_layer.in_dim));
        let has_dh = dh.is_some();
        layer_backward(params, mu_layer, dmu, h.view(), &enc_rows, dh, grad);
        layer_backward(params, lv_layer, dlv, h, &enc_rows, None, grad);
        if has_dh {
            gemm(
                T::one(),
                view(dlv, n, z_dim),
                weight(params, lv_layer),
                T::one(),
                view_mut(&mut grad_a[..n * lv_layer.in_dim], n, lv_layer.in_dim),
            );
        }

        // Encoder hidden layers, last to first.
        for (l, layer) in enc_hidden.iter().enumerate().rev() {
            let act = &enc[l][..n * layer.out_dim];
            let delta = &mut grad_a[..n * layer.out_dim];
            relu_mask(delta, act);
            let input = if l == 0 {
                x.view()
            } else {
                view(&enc[l - 1], n, layer.in_dim)
            };
            let d_in = (l > 0).then(|| sized(grad_b, n * layer.in_dim));
            layer_backward(params, layer, delta, input, &enc_rows, d_in, grad);
            std::mem::swap(grad_a, grad_b);
        }
    }
}

/// `out = input W^T + b`, then ReLU if asked. `out: [rows, out_dim]`.
fn linear<T: Float>(
    params: &[T],
    layer: &LinearLayout,
    input: ArrayView2<T>,
    out: &mut [T],
    relu: bool,
) {
    let rows = input.nrows();
    gemm(
        T::one(),
        input,
        weight(params, layer).t(),
        T::zero(),
        view_mut(out, rows, layer.out_dim),
    );
    add_bias_act(out, &params[layer.bias.clone()], relu);
}

/// Backward through a linear layer given `delta = dL/d(output)` (`[rows, out]`, final): the
/// layer's weight and bias gradients (`dW = delta_s^T input_s`, `db = colsum(delta_s)` per shard
/// `s`, added along the tree; `dW` by the fused [`tree_weight_grad`]) into `grad`; and, if asked,
/// `d_in = delta W` for all rows at once. The two run side by side.
fn layer_backward<T: Float>(
    params: &[T],
    layer: &LinearLayout,
    delta: &[T],
    input: ArrayView2<T>,
    rows: &ShardRows<T>,
    d_in: Option<&mut [T]>,
    grad: &mut [T],
) {
    let (out_dim, in_dim) = (layer.out_dim, layer.in_dim);
    // The layout stores a layer's bias right after its weight: one block per layer.
    debug_assert_eq!(layer.weight.end, layer.bias.start);
    let weight_len = layer.weight.len();
    let (dw, db) = grad[layer.weight.start..layer.bias.end].split_at_mut(weight_len);
    let mut weight_grads = || {
        // The fused kernel reads rows of a standard-layout input (every caller's is).
        let input = input.as_standard_layout();
        let x = input.as_slice().expect("standard layout");
        tree_weight_grad(&rows.program(), delta, out_dim, x, in_dim, in_dim, dw);
        rows.tree_sum(db, &|r, buf| {
            colsum_into(&delta[r.start * out_dim..r.end * out_dim], out_dim, buf)
        });
    };
    match d_in {
        Some(d_in) => {
            let n = input.nrows();
            rayon::join(weight_grads, || {
                gemm(
                    T::one(),
                    view(delta, n, out_dim),
                    weight(params, layer),
                    T::zero(),
                    view_mut(d_in, n, in_dim),
                )
            });
        }
        None => weight_grads(),
    }
}
