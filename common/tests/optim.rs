//! Optimizers against PyTorch's reference formulas, evaluated in f64.
//!
//! The expected tables below were printed by this script (python3, f64 throughout), which
//! restates torch.optim.Adam/AdamW and SGD:
//!
//! ```python
//! def adam(p, gs, lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.0):
//!     m = [0.0]*len(p); v = [0.0]*len(p); out = []
//!     for t, g in enumerate(gs, start=1):
//!         p = [x*(1-lr*wd) for x in p]                        # AdamW: decoupled decay first
//!         m = [b1*a + (1-b1)*b for a, b in zip(m, g)]
//!         v = [b2*a + (1-b2)*b*b for a, b in zip(v, g)]
//!         bc1 = 1 - b1**t; bc2 = 1 - b2**t
//!         p = [x - lr/bc1 * a / ((c**0.5)/(bc2**0.5) + eps) for x, a, c in zip(p, m, v)]
//!         out.append(p)
//!     return out
//! def sgd(p, gs, lr, mom=0.0, damp=0.0, nesterov=False, wd=0.0):
//!     buf = None; out = []
//!     for g in gs:
//!         d = [a + wd*x for a, x in zip(g, p)]                # coupled weight decay
//!         if mom != 0:
//!             buf = list(d) if buf is None else [mom*b + (1-damp)*a for b, a in zip(buf, d)]
//!             d = [a + mom*b for a, b in zip(d, buf)] if nesterov else list(buf)
//!         p = [x - lr*a for x, a in zip(p, d)]
//!         out.append(p)
//!     return out
//! p0 = [1.0, -2.0, 0.5]
//! gs = [[0.1, -0.2, 0.3], [0.2, 0.1, -0.1], [-0.05, 0.4, 0.0]]
//! ```
//!
//! Our steps run in f32 (as PyTorch does for f32 tensors), so they match to [`TOL`].

use common::optim::{Moments, OptimizerConfig, OptimizerState, clip_grad_norm};

const P0: [f32; 3] = [1.0, -2.0, 0.5];
const GRADS: [[f32; 3]; 3] = [[0.1, -0.2, 0.3], [0.2, 0.1, -0.1], [-0.05, 0.4, 0.0]];

/// f32 arithmetic against an f64 reference on values of order 1: a few ulp of f32 (~1.2e-7 each)
/// per step, plus the f32 rounding of the inputs (0.1 is not exact in f32).
const TOL: Tolerance = Tolerance {
    abs: 2e-6,
    rel: 2e-6,
};

#[derive(Debug, Clone, Copy)]
struct Tolerance {
    abs: f64,
    rel: f64,
}

fn assert_close(actual: &[f32], expected: &[f64], tol: Tolerance, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let err = (f64::from(a) - e).abs();
        assert!(
            err <= tol.abs + tol.rel * e.abs(),
            "{what}[{i}]: got {a}, expected {e} (error {err:e})"
        );
    }
}

/// Runs three steps from `P0` with `GRADS` and compares every step with `expected`.
fn check_three_steps(config: OptimizerConfig, expected: [[f64; 3]; 3]) {
    config.validate().unwrap();
    let mut params = P0.to_vec();
    let mut state = config.init_state(params.len());
    for (t, (grad, want)) in GRADS.iter().zip(expected).enumerate() {
        config.step(&mut params, grad, &mut state).unwrap();
        assert_close(&params, &want, TOL, &format!("{config:?} step {}", t + 1));
    }
    assert_eq!(state.step, 3);
}

#[test]
fn adam_matches_reference_for_three_steps() {
    // Step 1 by hand: m = 0.1 g, v = 0.001 g^2, bc1 = 0.1, bc2 = 0.001, so
    // p -= 0.01 * g / (|g| + 1e-8)  =>  p = p0 - 0.01 sign(g) (1 - 1e-8/|g|):
    // 1 - 0.01 (1 - 1e-7) = 0.990000001; -2 + 0.01 (1 - 5e-8) = -1.9900000005; ...
    check_three_steps(
        OptimizerConfig::adam(0.01),
        [
            [0.9900000009999999, -1.9900000005, 0.4900000003333333],
            [0.9803481813521252, -1.9873366302718676, 0.48599781479280807],
            [0.9744621144698112, -1.991909947999135, 0.48290411380154363],
        ],
    );
}

#[test]
fn adamw_decays_decoupled_before_the_update() {
    // Step 1 by hand: p0 * (1 - 0.01 * 0.1) - 0.01 sign(g) (1 - 1e-8/|g|):
    // 1 * 0.999 - 0.01 + 1e-9 = 0.989000001.
    let config = OptimizerConfig::Adam {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    check_three_steps(
        config,
        [
            [0.9890000009999999, -1.9880000005, 0.4895000003333333],
            [0.9783591813511252, -1.9833486302713677, 0.48500831479247475],
            [0.9714947552874601, -1.9859385993683636, 0.48142960548641783],
        ],
    );
}

#[test]
fn adamw_with_zero_gradient_only_decays() {
    // m = v = 0, so the Adam update is 0 / (0 + eps) = 0 and only p *= 1 - lr*wd remains.
    let config = OptimizerConfig::Adam {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.5,
    };
    let mut params = vec![2.0_f32, -4.0];
    let mut state = config.init_state(2);
    config.step(&mut params, &[0.0, 0.0], &mut state).unwrap();
    assert_eq!(params, [2.0 * 0.95_f32, -4.0 * 0.95_f32]);
}

#[test]
fn adam_first_step_is_lr_times_sign_of_gradient() {
    // Bias correction: m_hat = g and v_hat = g^2 after one step, so the update is
    // lr * g / (|g| + eps) ~ lr * sign(g) whatever the gradient's scale.
    let lr = 1e-3;
    let config = OptimizerConfig::adam(lr);
    let grad = [1e-4_f32, -3e-2, 7.0, -5e3, 0.0];
    let mut params = vec![0.0_f32; grad.len()];
    let mut state = config.init_state(grad.len());
    config.step(&mut params, &grad, &mut state).unwrap();
    let expected: Vec<f64> = grad
        .iter()
        .map(|&g| -lr * f64::from(g).signum() * f64::from(g != 0.0))
        .collect();
    // eps / |g| <= 1e-4 of the step for the smallest gradient.
    assert_close(
        &params,
        &expected,
        Tolerance {
            abs: 1e-10,
            rel: 2e-4,
        },
        "first Adam step",
    );
}

#[test]
fn sgd_plain_matches_reference() {
    // p -= 0.1 g: [1 - 0.01, -2 + 0.02, 0.5 - 0.03], then [-0.02, -0.01, +0.01], ...
    check_three_steps(
        OptimizerConfig::sgd(0.1, 0.0),
        [
            [0.99, -1.98, 0.47],
            [0.97, -1.99, 0.48],
            [0.975, -2.03, 0.48],
        ],
    );
}

#[test]
fn sgd_momentum_matches_reference() {
    // b1 = g1 = [0.1, -0.2, 0.3]; b2 = 0.9 b1 + g2 = [0.29, -0.08, 0.17];
    // p2 = p1 - 0.1 b2 = [0.99 - 0.029, -1.98 + 0.008, 0.47 - 0.017] = [0.961, -1.972, 0.453].
    check_three_steps(
        OptimizerConfig::sgd(0.1, 0.9),
        [
            [0.99, -1.98, 0.47],
            [0.961, -1.972, 0.45299999999999996],
            [0.9399, -2.0048, 0.4377],
        ],
    );
}

#[test]
fn sgd_dampening_scales_new_gradients_only_after_the_first_step() {
    // b1 = g1 (undamped); b2 = 0.9 b1 + 0.5 g2 = [0.19, -0.13, 0.22]; p2 = p1 - 0.1 b2.
    let config = OptimizerConfig::Sgd {
        lr: 0.1,
        momentum: 0.9,
        dampening: 0.5,
        nesterov: false,
        weight_decay: 0.0,
    };
    check_three_steps(
        config,
        [
            [0.99, -1.98, 0.47],
            [0.971, -1.967, 0.44799999999999995],
            [0.9563999999999999, -1.9753, 0.42819999999999997],
        ],
    );
}

#[test]
fn sgd_nesterov_matches_reference() {
    // Step 1: b = g, d = g + 0.9 b = 1.9 g, p = p0 - 0.19 g = [0.981, -1.962, 0.443].
    let config = OptimizerConfig::Sgd {
        lr: 0.1,
        momentum: 0.9,
        dampening: 0.0,
        nesterov: true,
        weight_decay: 0.0,
    };
    check_three_steps(
        config,
        [
            [0.981, -1.962, 0.443],
            [0.9349, -1.9647999999999999, 0.4377],
            [0.9209099999999999, -2.0343199999999997, 0.42393],
        ],
    );
}

#[test]
fn sgd_weight_decay_is_coupled() {
    // Step 1: d = g + 0.01 p0 = [0.11, -0.22, 0.305], p = p0 - 0.1 d = [0.989, -1.978, 0.4695].
    let config = OptimizerConfig::Sgd {
        lr: 0.1,
        momentum: 0.9,
        dampening: 0.0,
        nesterov: false,
        weight_decay: 0.01,
    };
    check_three_steps(
        config,
        [
            [0.989, -1.978, 0.46950000000000003],
            [0.9581109999999999, -1.966222, 0.45158050000000005],
            [0.934352789, -1.9936555779999998, 0.43500136950000007],
        ],
    );
}

#[test]
fn clipping_scales_to_max_norm_and_returns_the_old_norm() {
    // ||(3, 4)|| = 5; coef = 1 / (5 + 1e-6); clipped = (3, 4) * coef.
    let mut grad = vec![3.0_f32, 4.0];
    let norm = clip_grad_norm(&mut grad, 1.0);
    assert_eq!(norm, 5.0);
    let coef = 1.0 / (5.0 + 1e-6);
    assert_close(&grad, &[3.0 * coef, 4.0 * coef], TOL, "clipped gradient");
    let new_norm = clip_grad_norm(&mut grad.clone(), f64::INFINITY);
    assert!(
        (new_norm - 1.0).abs() < 1e-6,
        "norm after clipping {new_norm}"
    );
}

#[test]
fn clipping_leaves_small_gradients_untouched() {
    let original = vec![0.3_f32, -0.4, 0.0];
    let mut grad = original.clone();
    let norm = clip_grad_norm(&mut grad, 1.0);
    assert!((norm - 0.5).abs() < 1e-7, "norm {norm}");
    assert_eq!(grad, original);

    let mut zeros = vec![0.0_f32; 4];
    assert_eq!(clip_grad_norm(&mut zeros, 0.0), 0.0);
    assert_eq!(zeros, [0.0; 4]);
}

#[test]
fn clipping_norm_is_accumulated_in_f64() {
    // 1e6 entries of 1e-3: in f32 the running sum of squares drifts; in f64 the norm is
    // sqrt(1e6 * 1e-6) = 1 to ~1e-9 (1e-3 itself is rounded to f32 first).
    let mut grad = vec![1e-3_f32; 1_000_000];
    let g = f64::from(1e-3_f32);
    let norm = clip_grad_norm(&mut grad, 10.0);
    assert!((norm - (1e6 * g * g).sqrt()).abs() < 1e-12, "norm {norm}");
}

/// Runs `steps` steps with gradients derived from the step index.
fn run(config: &OptimizerConfig, params: &mut [f32], state: &mut OptimizerState, steps: usize) {
    for _ in 0..steps {
        let t = state.step as f32;
        let grad: Vec<f32> = (0..params.len())
            .map(|i| ((i as f32 + 1.0) * (t + 1.0)).sin() * 0.1)
            .collect();
        config.step(params, &grad, state).unwrap();
    }
}

#[test]
fn state_round_trips_through_buffers_bit_for_bit() {
    let configs = [
        OptimizerConfig::adam(1e-2),
        OptimizerConfig::Adam {
            lr: 1e-2,
            beta1: 0.8,
            beta2: 0.99,
            eps: 1e-6,
            weight_decay: 0.05,
        },
        OptimizerConfig::sgd(0.1, 0.0),
        OptimizerConfig::sgd(0.1, 0.9),
        OptimizerConfig::Sgd {
            lr: 0.1,
            momentum: 0.5,
            dampening: 0.0,
            nesterov: true,
            weight_decay: 1e-3,
        },
    ];
    for config in configs {
        let n = 37;
        let mut params: Vec<f32> = (0..n).map(|i| i as f32 * 0.01 - 0.2).collect();
        let mut state = config.init_state(n);
        run(&config, &mut params, &mut state, 2);

        let saved: Vec<(String, Vec<f32>)> = state
            .buffers()
            .into_iter()
            .map(|(name, b)| (name.to_string(), b.to_vec()))
            .collect();
        let mut restored = OptimizerState::from_buffers(&config, state.step, saved).unwrap();
        assert_eq!(restored, state, "{config:?}");

        let mut restored_params = params.clone();
        run(&config, &mut params, &mut state, 3);
        run(&config, &mut restored_params, &mut restored, 3);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&params), bits(&restored_params), "{config:?}");
        assert_eq!(state, restored, "{config:?}");
    }
}

#[test]
fn buffers_have_pytorch_names() {
    let adam = OptimizerConfig::adam(1e-3).init_state(4);
    let names: Vec<_> = adam.buffers().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["exp_avg", "exp_avg_sq"]);

    let sgd = OptimizerConfig::sgd(0.1, 0.9);
    let mut state = sgd.init_state(2);
    assert!(
        state.buffers().is_empty(),
        "no momentum buffer before step 1"
    );
    sgd.step(&mut [1.0, 2.0], &[0.5, -0.5], &mut state).unwrap();
    assert_eq!(state.buffers(), [("momentum_buffer", &[0.5_f32, -0.5][..])]);

    let plain = OptimizerConfig::sgd(0.1, 0.0);
    let mut state = plain.init_state(2);
    plain
        .step(&mut [1.0, 2.0], &[0.5, -0.5], &mut state)
        .unwrap();
    assert!(state.buffers().is_empty());
}

#[test]
fn from_buffers_rejects_wrong_names_and_lengths() {
    let adam = OptimizerConfig::adam(1e-3);
    let buf = |name: &str, n: usize| (name.to_string(), vec![0.0_f32; n]);
    let err = |r: common::Result<OptimizerState>| r.unwrap_err().to_string();

    let e = err(OptimizerState::from_buffers(
        &adam,
        1,
        vec![buf("exp_avg", 3)],
    ));
    assert!(e.contains("exp_avg_sq"), "{e}");
    let e = err(OptimizerState::from_buffers(
        &adam,
        1,
        vec![
            buf("exp_avg", 3),
            buf("exp_avg_sq", 3),
            buf("momentum_buffer", 3),
        ],
    ));
    assert!(e.contains("momentum_buffer"), "{e}");
    let e = err(OptimizerState::from_buffers(
        &adam,
        1,
        vec![buf("exp_avg", 3), buf("exp_avg_sq", 4)],
    ));
    assert!(e.contains("different lengths"), "{e}");
    let e = err(OptimizerState::from_buffers(
        &adam,
        1,
        vec![buf("exp_avg", 3), buf("exp_avg", 3)],
    ));
    assert!(e.contains("twice"), "{e}");

    let sgd = OptimizerConfig::sgd(0.1, 0.9);
    let e = err(OptimizerState::from_buffers(&sgd, 5, vec![]));
    assert!(e.contains("momentum_buffer"), "{e}");
    let fresh = OptimizerState::from_buffers(&sgd, 0, vec![]).unwrap();
    assert_eq!(fresh, sgd.init_state(3));
    let e = err(OptimizerState::from_buffers(
        &OptimizerConfig::sgd(0.1, 0.0),
        5,
        vec![buf("momentum_buffer", 3)],
    ));
    assert!(e.contains("without momentum"), "{e}");
}

#[test]
fn length_mismatches_are_errors_and_change_nothing() {
    let adam = OptimizerConfig::adam(1e-3);
    let mut params = vec![1.0_f32; 3];
    let mut state = adam.init_state(3);

    let e = adam.step(&mut params, &[0.1; 4], &mut state).unwrap_err();
    assert!(e.to_string().contains("3 parameters but 4 gradient"), "{e}");

    let mut wrong_state = adam.init_state(5);
    let e = adam
        .step(&mut params, &[0.1; 3], &mut wrong_state)
        .unwrap_err();
    assert!(e.to_string().contains("exp_avg"), "{e}");

    let mut sgd_state = OptimizerConfig::sgd(0.1, 0.0).init_state(3);
    let e = adam
        .step(&mut params, &[0.1; 3], &mut sgd_state)
        .unwrap_err();
    assert!(e.to_string().contains("sgd"), "{e}");

    assert_eq!(params, [1.0; 3]);
    assert_eq!(state.step, 0);
    assert_eq!(wrong_state.step, 0);

    let sgd = OptimizerConfig::sgd(0.1, 0.9);
    let mut state = OptimizerState {
        step: 1,
        moments: Moments::Sgd {
            momentum_buffer: Some(vec![0.0; 2]),
        },
    };
    assert!(sgd.step(&mut params, &[0.1; 3], &mut state).is_err());
}

#[test]
fn validate_rejects_what_pytorch_rejects() {
    OptimizerConfig::default().validate().unwrap();
    OptimizerConfig::sgd(0.1, 0.9).validate().unwrap();
    let bad = [
        OptimizerConfig::adam(-1.0),
        OptimizerConfig::adam(f64::NAN),
        OptimizerConfig::Adam {
            lr: 1e-3,
            beta1: 1.0,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
        OptimizerConfig::Adam {
            lr: 1e-3,
            beta1: 0.9,
            beta2: -0.1,
            eps: 1e-8,
            weight_decay: 0.0,
        },
        OptimizerConfig::sgd(0.1, -0.5),
        OptimizerConfig::Sgd {
            lr: 0.1,
            momentum: 0.9,
            dampening: 0.1,
            nesterov: true,
            weight_decay: 0.0,
        },
        OptimizerConfig::Sgd {
            lr: 0.1,
            momentum: 0.0,
            dampening: 0.0,
            nesterov: true,
            weight_decay: 0.0,
        },
    ];
    for config in bad {
        assert!(config.validate().is_err(), "{config:?} should be rejected");
    }
}

#[test]
fn config_serialises_with_a_kind_tag() {
    let config = OptimizerConfig::default();
    let json = serde_json::to_string(&config).unwrap();
    assert_eq!(
        json,
        r#"{"kind":"adam","lr":0.001,"beta1":0.9,"beta2":0.999,"eps":1e-8,"weight_decay":0.0}"#
    );
    let back: OptimizerConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, config);
}

#[test]
fn steps_are_identical_for_any_thread_count() {
    // Long enough to take the parallel path (several fixed chunks).
    let n = 300_000;
    for config in [
        OptimizerConfig::default(),
        OptimizerConfig::Sgd {
            lr: 0.05,
            momentum: 0.9,
            dampening: 0.0,
            nesterov: true,
            weight_decay: 1e-4,
        },
    ] {
        let results: Vec<(Vec<u32>, f64)> = [1, 3]
            .into_iter()
            .map(|threads| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| {
                    let mut params: Vec<f32> = (0..n).map(|i| (i as f32 * 1e-3).cos()).collect();
                    let mut state = config.init_state(n);
                    let mut norm = 0.0;
                    for t in 0..3 {
                        let mut grad: Vec<f32> = (0..n)
                            .map(|i| ((i * (t + 2)) as f32 * 1e-4).sin())
                            .collect();
                        norm += clip_grad_norm(&mut grad, 50.0);
                        config.step(&mut params, &grad, &mut state).unwrap();
                    }
                    (params.iter().map(|x| x.to_bits()).collect(), norm)
                })
            })
            .collect();
        assert_eq!(results[0].0, results[1].0, "{config:?}");
        assert_eq!(results[0].1.to_bits(), results[1].1.to_bits(), "{config:?}");
    }
}

/// The coordinator divides the summed gradient by the step's example count inside the optimizer's
/// pass (`step_scaled`); it must give exactly the bits of dividing first.
#[test]
fn a_scaled_step_equals_dividing_first_bit_for_bit() {
    let n = 70_000; // past the parallel threshold
    let grad: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 * 0.37 - 185.0)
        .collect();
    let start: Vec<f32> = (0..n).map(|i| (i % 97) as f32 * 0.01 - 0.4).collect();
    let divisor = 128.0f32;
    let divided: Vec<f32> = grad.iter().map(|g| g / divisor).collect();
    let sgd_nesterov = match OptimizerConfig::sgd(0.05, 0.9) {
        OptimizerConfig::Sgd { lr, momentum, .. } => OptimizerConfig::Sgd {
            lr,
            momentum,
            dampening: 0.0,
            nesterov: true,
            weight_decay: 0.01,
        },
        other => other,
    };
    for config in [
        OptimizerConfig::adam(1e-3),
        OptimizerConfig::sgd(0.05, 0.0),
        sgd_nesterov,
    ] {
        let (mut a, mut b) = (start.clone(), start.clone());
        let (mut sa, mut sb) = (config.init_state(n), config.init_state(n));
        for _ in 0..3 {
            config.step(&mut a, &divided, &mut sa).unwrap();
            config.step_scaled(&mut b, &grad, divisor, &mut sb).unwrap();
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b), "{config:?}");
        assert_eq!(sa, sb, "{config:?}");
        assert_ne!(a, start);
    }
}
