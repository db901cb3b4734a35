//! Central finite-difference checks of the hand-written ELBO gradient, in f64.
//!
//! The loss is `L(theta) = -sum_i ELBO_i(theta)` with the noise `eps` held fixed, so `L` is a
//! deterministic, piecewise-smooth function of the parameters (ReLU kinks are met with probability
//! ~0 at these sizes). For every parameter tensor we compare sampled entries of the analytic
//! gradient with `(L(theta + h e_j) - L(theta - h e_j)) / 2h`, and the whole vector through a
//! directional derivative `(L(theta + h v) - L(theta - h v)) / 2h = grad . v` for a random `v`.
//!
//! The derivatives under test (see `common::model::Vae` for the full list):
//! - output layer, Bernoulli: `dL/df = (sigmoid(f) - x) / K`; Gaussian: `(f - x) / (c K)`;
//! - each linear layer: `dL/dW = delta^T input`, `dL/db = sum_rows delta`, `dL/dinput = delta W`,
//!   ReLU passes `delta` where its output is positive;
//! - reparameterisation `z = mu + exp(lv/2) eps`: `dz/dmu = 1`, `dz/dlv = exp(lv/2) eps / 2`;
//! - KL = 1/2 sum (mu^2 + exp(lv) - lv - 1): `dKL/dmu = mu`, `dKL/dlv = (exp(lv) - 1) / 2`.
//!
//! Central differences have truncation error O(h^2) and round-off ~ eps_f64 |L| / h: with
//! h = 1e-5 and |L| ~ 10-100 both are below 1e-8, far inside the tolerance below.

use common::model::KeyedRng;
use common::model::fill_eps;
use common::model::init_params;
use common::model::{Likelihood, ModelConfig};
use common::model::{Vae, Workspace};
use ndarray::{Array2, ArrayView2};

/// Finite-difference step.
const H: f64 = 1e-5;
/// Relative tolerance of the comparison ...
const REL_TOL: f64 = 1e-6;
/// ... with this absolute floor, for derivatives that are (nearly) zero.
const ABS_TOL: f64 = 1e-8;
/// Entries checked per tensor (all of them when the tensor is smaller).
const ENTRIES_PER_TENSOR: usize = 8;

/// `got` (the analytic value) against `want` (the finite difference or reference).
fn assert_close(got: f64, want: f64, what: &str) {
    let err = (got - want).abs();
    let tol = ABS_TOL + REL_TOL * got.abs().max(want.abs());
    assert!(
        err <= tol,
        "{what}: got {got:e}, want {want:e}, |diff| {err:e} > {tol:e}"
    );
}

struct Case {
    vae: Vae,
    params: Vec<f64>,
    x: Array2<f64>,
    eps: Array2<f64>,
}

impl Case {
    fn new(config: ModelConfig, n: usize, samples: usize, seed: u64) -> Case {
        let vae = Vae::new(config).unwrap();
        let layout = vae.layout().clone();
        let mut params: Vec<f64> = init_params(&layout, seed);
        // Larger-than-default weights make every term (and the KL) matter; biases stay as drawn.
        for p in &mut params {
            *p *= 1.5;
        }
        let d = vae.config().input_dim;
        let mut rng = KeyedRng::new(&[99, seed]);
        let gaussian = matches!(vae.config().likelihood, Likelihood::Gaussian { .. });
        let x = Array2::from_shape_fn((n, d), |_| {
            let u = rng.next_open01();
            if gaussian { 4.0 * u - 2.0 } else { u }
        });
        let z = vae.config().latent;
        let mut eps = Array2::zeros((n * samples, z));
        let ids: Vec<u64> = (0..n as u64).map(|i| 1000 + i).collect();
        fill_eps(seed, 0, &ids, 0, samples, z, eps.as_slice_mut().unwrap());
        Case {
            vae,
            params,
            x,
            eps,
        }
    }

    fn loss(&self, params: &[f64], ws: &mut Workspace<f64>) -> f64 {
        -self
            .vae
            .elbo(params, self.x.view(), self.eps.view(), ws)
            .unwrap()
            .elbo
    }

    fn grad(&self) -> (Vec<f64>, f64) {
        let mut ws = Workspace::new();
        let mut grad = vec![f64::NAN; self.params.len()];
        let sums = self
            .vae
            .elbo_grad(
                &self.params,
                self.x.view(),
                self.eps.view(),
                &mut grad,
                &mut ws,
            )
            .unwrap();
        (grad, -sums.elbo)
    }

    /// Checks sampled entries of every tensor and one directional derivative.
    fn check(&self, label: &str) {
        let (grad, loss) = self.grad();
        let mut ws = Workspace::new();
        assert_close(
            loss,
            self.loss(&self.params, &mut ws),
            "loss, forward vs forward+backward",
        );
        assert!(
            grad.iter().all(|g| g.is_finite()),
            "{label}: every gradient entry written"
        );

        let mut rng = KeyedRng::new(&[7, self.params.len() as u64]);
        let mut p = self.params.clone();
        for tensor in self.vae.layout().tensors() {
            let len = tensor.range.len();
            let picks: Vec<usize> = if len <= ENTRIES_PER_TENSOR {
                (0..len).collect()
            } else {
                (0..ENTRIES_PER_TENSOR)
                    .map(|_| rng.below(len as u64) as usize)
                    .collect()
            };
            for j in picks {
                let at = tensor.range.start + j;
                let orig = p[at];
                p[at] = orig + H;
                let up = self.loss(&p, &mut ws);
                p[at] = orig - H;
                let down = self.loss(&p, &mut ws);
                p[at] = orig;
                let numeric = (up - down) / (2.0 * H);
                assert_close(grad[at], numeric, &format!("{label}: {}[{j}]", tensor.name));
            }
        }

        // Whole vector: grad . v against the derivative along a random unit direction v.
        let mut v: Vec<f64> = (0..p.len()).map(|_| rng.next_open01() - 0.5).collect();
        let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
        v.iter_mut().for_each(|a| *a /= norm);
        let shifted = |sign: f64| -> Vec<f64> {
            self.params
                .iter()
                .zip(&v)
                .map(|(p, d)| p + sign * H * d)
                .collect()
        };
        let numeric =
            (self.loss(&shifted(1.0), &mut ws) - self.loss(&shifted(-1.0), &mut ws)) / (2.0 * H);
        let analytic: f64 = grad.iter().zip(&v).map(|(g, d)| g * d).sum();
        assert_close(
            analytic,
            numeric,
            &format!("{label}: directional derivative"),
        );
    }
}

fn small(hidden: Vec<usize>, likelihood: Likelihood) -> ModelConfig {
    ModelConfig {
        input_dim: 7,
        hidden,
        latent: 3,
        likelihood,
    }
}

const GAUSSIAN: Likelihood = Likelihood::Gaussian { variance: 0.7 };

#[test]
fn bernoulli_one_sample() {
    Case::new(small(vec![6], Likelihood::Bernoulli), 5, 1, 1).check("bernoulli K=1");
}

#[test]
fn bernoulli_three_samples() {
    Case::new(small(vec![6], Likelihood::Bernoulli), 5, 3, 2).check("bernoulli K=3");
}

#[test]
fn gaussian_one_sample() {
    Case::new(small(vec![6], GAUSSIAN), 5, 1, 3).check("gaussian K=1");
}

#[test]
fn gaussian_three_samples() {
    Case::new(small(vec![6], GAUSSIAN), 5, 3, 4).check("gaussian K=3");
}

#[test]
fn two_hidden_layers_both_likelihoods() {
    Case::new(small(vec![8, 5], Likelihood::Bernoulli), 4, 3, 5).check("bernoulli 7-8-5-3");
    Case::new(small(vec![8, 5], GAUSSIAN), 4, 1, 6).check("gaussian 7-8-5-3");
}

#[test]
fn no_hidden_layers() {
    Case::new(small(vec![], Likelihood::Bernoulli), 4, 2, 7).check("bernoulli 7-3");
}

/// A direct transcription of docs/design.md §1 for a one-hidden-layer model, loops only, sharing
/// no code with the engine.
struct Reference<'a> {
    vae: &'a Vae,
    params: &'a [f64],
}

impl Reference<'_> {
    fn linear(&self, name: &str, input: &[f64], relu: bool) -> Vec<f64> {
        let layer = self
            .vae
            .layout()
            .layers()
            .iter()
            .find(|l| l.name == name)
            .unwrap();
        (0..layer.out_dim)
            .map(|o| {
                let mut acc = self.params[layer.bias.start + o];
                for (i, v) in input.iter().enumerate() {
                    acc += self.params[layer.weight.start + o * layer.in_dim + i] * v;
                }
                if relu { acc.max(0.0) } else { acc }
            })
            .collect()
    }

    /// (mu, logvar) of q(z|x). PyTorch names: fc1, fc21, fc22.
    fn encode(&self, x: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let h = self.linear("fc1", x, true);
        (
            self.linear("fc21", &h, false),
            self.linear("fc22", &h, false),
        )
    }

    /// log p(x|z), decoder fc3, fc4.
    fn log_px(&self, x: &[f64], z: &[f64]) -> f64 {
        let f = self.linear("fc4", &self.linear("fc3", z, true), false);
        match self.vae.config().likelihood {
            // x log s(f) + (1 - x) log(1 - s(f)), the textbook form
            Likelihood::Bernoulli => x
                .iter()
                .zip(&f)
                .map(|(x, f)| {
                    let s = 1.0 / (1.0 + (-f).exp());
                    x * s.ln() + (1.0 - x) * (1.0 - s).ln()
                })
                .sum(),
            Likelihood::Gaussian { variance: c } => {
                let d = x.len() as f64;
                let sq: f64 = x.iter().zip(&f).map(|(x, f)| (x - f) * (x - f)).sum();
                -d / 2.0 * (2.0 * std::f64::consts::PI * c).ln() - sq / (2.0 * c)
            }
        }
    }

    /// (ELBO, KL) of one example with the given noise rows.
    fn elbo(&self, x: &[f64], eps: ArrayView2<f64>) -> (f64, f64) {
        let (mu, lv) = self.encode(x);
        let kl: f64 = mu
            .iter()
            .zip(&lv)
            .map(|(m, l)| 0.5 * (m * m + l.exp() - l - 1.0))
            .sum();
        let k = eps.nrows();
        let mut recon = 0.0;
        for row in eps.rows() {
            let z: Vec<f64> = (0..mu.len())
                .map(|j| mu[j] + (lv[j] / 2.0).exp() * row[j])
                .collect();
            recon += self.log_px(x, &z) / k as f64;
        }
        (recon - kl, kl)
    }

    /// log (1/k) sum_j p(x, z_j) / q(z_j|x), with full Gaussian densities, naive log-sum-exp.
    fn iw_bound(&self, x: &[f64], eps: ArrayView2<f64>) -> f64 {
        let (mu, lv) = self.encode(x);
        let ln_2pi = (2.0 * std::f64::consts::PI).ln();
        let weights: Vec<f64> = eps
            .rows()
            .into_iter()
            .map(|e| {
                let z: Vec<f64> = (0..mu.len())
                    .map(|j| mu[j] + (lv[j] / 2.0).exp() * e[j])
                    .collect();
                let log_prior: f64 = z.iter().map(|z| -0.5 * (ln_2pi + z * z)).sum();
                let log_q: f64 = (0..mu.len())
                    .map(|j| {
                        let var = lv[j].exp();
                        -0.5 * (ln_2pi + lv[j] + (z[j] - mu[j]).powi(2) / var)
                    })
                    .sum();
                (self.log_px(x, &z) + log_prior - log_q).exp()
            })
            .collect();
        (weights.iter().sum::<f64>() / weights.len() as f64).ln()
    }
}

#[test]
fn elbo_value_matches_a_direct_transcription() {
    for likelihood in [Likelihood::Bernoulli, GAUSSIAN] {
        let case = Case::new(small(vec![6], likelihood), 4, 3, 11);
        let mut ws = Workspace::new();
        let sums = case
            .vae
            .elbo(&case.params, case.x.view(), case.eps.view(), &mut ws)
            .unwrap();
        let (mut elbo, mut kl) = (0.0, 0.0);
        for i in 0..4 {
            let eps = case.eps.slice(ndarray::s![i * 3..(i + 1) * 3, ..]);
            let reference = Reference {
                vae: &case.vae,
                params: &case.params,
            };
            let (e, k) = reference.elbo(case.x.row(i).as_slice().unwrap(), eps);
            elbo += e;
            kl += k;
        }
        assert_eq!(sums.examples, 4);
        assert_close(sums.elbo, elbo, "ELBO vs reference");
        assert_close(sums.kl, kl, "KL vs reference");
        assert_close(sums.recon - sums.kl, sums.elbo, "ELBO = recon - KL");
        assert!(sums.kl > 0.0);
    }
}

/// The closed-form KL against a Monte-Carlo estimate of E_q[log q(z|x) - log p(z)], with a
/// tolerance of 5 standard errors computed from the same samples.
#[test]
fn closed_form_kl_agrees_with_monte_carlo() {
    let case = Case::new(small(vec![6], Likelihood::Bernoulli), 3, 1, 12);
    let mut ws = Workspace::new();
    case.vae
        .elbo(&case.params, case.x.view(), case.eps.view(), &mut ws)
        .unwrap();
    let (mu, logvar) = ws.posterior();
    let z_dim = case.vae.config().latent;
    let samples = 200_000;
    for i in 0..3 {
        let mu = &mu[i * z_dim..(i + 1) * z_dim];
        let lv = &logvar[i * z_dim..(i + 1) * z_dim];
        let mut rng = KeyedRng::new(&[12, i as u64]);
        let (mut sum, mut sum_sq) = (0.0, 0.0);
        let mut e = vec![0.0; z_dim + 1];
        for _ in 0..samples {
            for pair in e.chunks_mut(2) {
                let (a, b) = rng.next_normal_pair();
                pair[0] = a;
                if pair.len() > 1 {
                    pair[1] = b;
                }
            }
            // log q(z) - log p(z) with z = mu + sigma e (the 2 pi terms cancel):
            // sum_j [ -lv_j/2 - e_j^2/2 + z_j^2/2 ]
            let mut d = 0.0;
            for j in 0..z_dim {
                let z = mu[j] + (lv[j] / 2.0).exp() * e[j];
                d += -lv[j] / 2.0 - e[j] * e[j] / 2.0 + z * z / 2.0;
            }
            sum += d;
            sum_sq += d * d;
        }
        let mean = sum / samples as f64;
        let stderr = ((sum_sq / samples as f64 - mean * mean) / samples as f64).sqrt();
        let closed = ws.row_kl()[i];
        assert!(
            (mean - closed).abs() < 5.0 * stderr,
            "example {i}: closed form {closed}, Monte Carlo {mean} +- {stderr}"
        );
        assert!(
            stderr < 0.05 * closed.max(0.1),
            "the estimate is informative"
        );
    }
}

#[test]
fn rejects_inputs_of_the_wrong_width_and_bad_noise() {
    let case = Case::new(small(vec![6], Likelihood::Bernoulli), 2, 1, 13);
    let mut ws = Workspace::new();
    let wide = Array2::<f64>::zeros((2, 8));
    let err = case
        .vae
        .elbo(&case.params, wide.view(), case.eps.view(), &mut ws)
        .unwrap_err();
    assert!(err.to_string().contains("8 columns"), "{err}");
    let bad_eps = Array2::<f64>::zeros((3, 3)); // not a multiple of 2 examples
    assert!(
        case.vae
            .elbo(&case.params, case.x.view(), bad_eps.view(), &mut ws)
            .is_err()
    );
    let mut grad = vec![0.0; 3];
    assert!(
        case.vae
            .elbo_grad(
                &case.params,
                case.x.view(),
                case.eps.view(),
                &mut grad,
                &mut ws
            )
            .is_err()
    );
}

/// The held-out report against the reference: the ELBO with the evaluation noise (K = 1) and the
/// importance-weighted bound with k = 5, over more examples than one evaluation chunk.
#[test]
fn evaluation_matches_a_direct_transcription() {
    use common::model::sample_eps;
    use common::model::{EVAL_EPOCH, evaluate};
    for likelihood in [Likelihood::Bernoulli, GAUSSIAN] {
        let case = Case::new(small(vec![6], likelihood), 150, 1, 21);
        let (seed, k, z_dim) = (5, 5, case.vae.config().latent);
        let report = evaluate(&case.vae, &case.params, case.x.view(), seed, k).unwrap();
        let reference = Reference {
            vae: &case.vae,
            params: &case.params,
        };
        let (mut elbo, mut kl, mut iw) = (0.0, 0.0, 0.0);
        for (row, x) in case.x.rows().into_iter().enumerate() {
            let x = x.as_slice().unwrap();
            let mut eps = Array2::<f64>::zeros((k, z_dim));
            for (j, mut e) in eps.rows_mut().into_iter().enumerate() {
                sample_eps(
                    seed,
                    EVAL_EPOCH,
                    row as u64,
                    j as u64,
                    e.as_slice_mut().unwrap(),
                );
            }
            let (e, l) = reference.elbo(x, eps.slice(ndarray::s![0..1, ..]));
            elbo += e;
            kl += l;
            iw += reference.iw_bound(x, eps.view());
        }
        let n = case.x.nrows() as f64;
        assert_eq!(report.examples, 150);
        assert_close(report.elbo, elbo / n, "mean ELBO vs reference");
        assert_close(report.kl, kl / n, "mean KL vs reference");
        assert_close(
            report.iw_bound.unwrap(),
            iw / n,
            "mean IW bound vs reference",
        );
        assert!(report.iw_bound.unwrap() > report.elbo - 1.0, "sanity");
    }
}
