//! The picture and report subcommands (`sample`, `reconstruct`, `traverse`, `scatter`,
//! `evaluate`, `plot`) through the real binary, and `write_run_images` as the run calls it, on a
//! small freshly initialised model and a small `.npy` dataset.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::data::{Dataset, synthetic_with};
use common::model::ModelConfig;
use common::train::Engine;
use coordinator::tools::chart::PALETTE;
use image::{GrayImage, RgbImage};

/// Grid geometry, restated here so the tests check the code rather than reuse it.
const SCALE: u32 = 2;
const PAD: u32 = 2;
const SIDE: u32 = 28;
/// The run seed recorded in the test model's metadata.
const RUN_SEED: u64 = 7;
/// Examples in the test data, and how many of them are held out.
const EXAMPLES: usize = 300;
const HOLDOUT: usize = 100;

/// Tiles are upscaled by SCALE, or more when a side is under 14 pixels: to at least 28.
fn scale((h, w): (u32, u32)) -> u32 {
    SCALE.max(28_u32.div_ceil(h.min(w)))
}

fn grid_size(rows: u32, cols: u32, (h, w): (u32, u32)) -> (u32, u32) {
    let scale = scale((h, w));
    (
        cols * w * scale + (cols + 1) * PAD,
        rows * h * scale + (rows + 1) * PAD,
    )
}

fn small_config(latent: usize) -> ModelConfig {
    ModelConfig {
        input_dim: 784,
        hidden: vec![32],
        latent,
        ..ModelConfig::default()
    }
}

/// A saved, freshly initialised model, a `.npy` dataset with labels, and the paths.
struct Fixture {
    dir: tempfile::TempDir,
    model: PathBuf,
    data: String,
    engine: Engine,
    params: Vec<f32>,
    heldout: Dataset,
}

impl Fixture {
    fn new(latent: usize) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::new(small_config(latent), 1, RUN_SEED).unwrap();
        let params = engine.init_params();
        let data = synthetic_with(EXAMPLES, 3);
        let images = dir.path().join("images.npy");
        let labels = dir.path().join("labels.npy");
        write_npy_f32(
            &images,
            &data.pixels().iter().copied().collect::<Vec<f32>>(),
        );
        write_npy_u8(&labels, data.labels.as_ref().unwrap());
        let data_spec = format!("npy:{},{}", images.display(), labels.display());
        let model = dir.path().join("model.safetensors");
        let extra = BTreeMap::from([
            ("seed".to_string(), RUN_SEED.to_string()),
            ("data".to_string(), data_spec.clone()),
        ]);
        common::formats::save_model(&model, engine.config(), &params, &extra).unwrap();
        let (_, heldout) = data.split_holdout(HOLDOUT).unwrap();
        Fixture {
            dir,
            model,
            data: data_spec,
            engine,
            params,
            heldout,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `coordinator SUBCOMMAND --model MODEL ARGS...` and checks it succeeded.
    fn run(&self, subcommand: &str, args: &[&str]) -> String {
        let out = self.try_run(subcommand, args);
        assert!(
            out.status.success(),
            "coordinator {subcommand} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn try_run(&self, subcommand: &str, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_coordinator"))
            .arg(subcommand)
            .arg("--model")
            .arg(&self.model)
            .args(args)
            .output()
            .unwrap()
    }
}

fn npy(path: &Path, descr: &str, shape: &str, data: &[u8]) {
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n' is a multiple of 64 bytes.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    bytes.extend(data);
    std::fs::write(path, bytes).unwrap();
}

fn write_npy_f32(path: &Path, pixels: &[f32]) {
    let n = pixels.len() / 784;
    let data: Vec<u8> = pixels.iter().flat_map(|v| v.to_le_bytes()).collect();
    npy(path, "<f4", &format!("({n}, 28, 28)"), &data);
}

fn write_npy_u8(path: &Path, labels: &[u8]) {
    npy(path, "|u1", &format!("({},)", labels.len()), labels);
}

fn open_gray(path: &Path) -> GrayImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{} does not decode: {e}", path.display()))
        .into_luma8()
}

fn open_rgb(path: &Path) -> RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{} does not decode: {e}", path.display()))
        .into_rgb8()
}

/// The pixels of tile `index` of a grid with `cols` columns (source-resolution samples: the
/// top-left pixel of each upscaled block).
fn tile(img: &GrayImage, cols: u32, index: u32, (h, w): (u32, u32)) -> Vec<u8> {
    let scale = scale((h, w));
    let x0 = PAD + (index % cols) * (w * scale + PAD);
    let y0 = PAD + (index / cols) * (h * scale + PAD);
    (0..h)
        .flat_map(|y| (0..w).map(move |x| (x, y)))
        .map(|(x, y)| img.get_pixel(x0 + x * scale, y0 + y * scale).0[0])
        .collect()
}

/// Variance of the grey levels inside the tiles (padding excluded) and how many distinct levels
/// they use.
fn tile_stats(img: &GrayImage, rows: u32, cols: u32, shape: (u32, u32)) -> (f64, usize) {
    let values: Vec<f64> = (0..rows * cols)
        .flat_map(|i| tile(img, cols, i, shape))
        .map(f64::from)
        .collect();
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64;
    let mut levels: Vec<u8> = values.iter().map(|&v| v as u8).collect();
    levels.sort_unstable();
    levels.dedup();
    (var, levels.len())
}

fn has_colour(img: &RgbImage, c: plotters::style::RGBColor) -> bool {
    img.pixels().any(|p| p.0 == [c.0, c.1, c.2])
}

fn distinct_colours(img: &RgbImage) -> usize {
    let mut colours: Vec<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    colours.sort_unstable();
    colours.dedup();
    colours.len()
}

#[test]
fn sample_writes_a_square_grid_of_decoded_prior_samples() {
    let f = Fixture::new(3);
    let out = f.path("samples.png");
    f.run(
        "sample",
        &["--out", out.to_str().unwrap(), "--n", "10", "--seed", "1"],
    );
    // 10 samples: ceil(sqrt(10)) = 4 columns, 3 rows.
    let img = open_gray(&out);
    assert_eq!(img.dimensions(), grid_size(3, 4, (SIDE, SIDE)));
    let (var, levels) = tile_stats(&img, 2, 4, (SIDE, SIDE));
    assert!(
        var > 0.0 && levels > 10,
        "blank tiles: var {var}, {levels} levels"
    );
    // Samples depend on the seed and differ from each other.
    let other = f.path("other.png");
    f.run(
        "sample",
        &["--out", other.to_str().unwrap(), "--n", "10", "--seed", "2"],
    );
    assert_ne!(open_gray(&other), img);
    assert_ne!(
        tile(&img, 4, 0, (SIDE, SIDE)),
        tile(&img, 4, 1, (SIDE, SIDE))
    );
}

#[test]
fn sample_needs_a_shape_for_non_square_images() {
    let dir = tempfile::tempdir().unwrap();
    let config = ModelConfig {
        input_dim: 12,
        hidden: vec![8],
        latent: 2,
        ..ModelConfig::default()
    };
    let engine = Engine::new(config.clone(), 1, 0).unwrap();
    let model = dir.path().join("model.safetensors");
    common::formats::save_model(&model, &config, &engine.init_params(), &BTreeMap::new()).unwrap();
    let out = dir.path().join("s.png");
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_coordinator"))
            .args(["sample", "--n", "4", "--model"])
            .arg(&model)
            .arg("--out")
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    };
    let refused = run(&[]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--shape"),
        "the error should say to pass --shape: {}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(!run(&["--shape", "5x5"]).status.success());
    assert!(run(&["--shape", "3x4"]).status.success());
    assert_eq!(open_gray(&out).dimensions(), grid_size(2, 2, (3, 4)));
}

#[test]
fn reconstruct_pairs_held_out_originals_with_reconstructions() {
    let f = Fixture::new(3);
    let out = f.path("recon.png");
    let stdout = f.run(
        "reconstruct",
        &[
            "--data",
            &f.data,
            "--holdout",
            &HOLDOUT.to_string(),
            "--out",
            out.to_str().unwrap(),
            "--n",
            "12",
        ],
    );
    assert!(stdout.contains("12 held-out images"), "{stdout}");
    // 12 pairs, 8 per row: 16 columns, 2 rows.
    let img = open_gray(&out);
    assert_eq!(img.dimensions(), grid_size(2, 16, (SIDE, SIDE)));
    // Even columns are the held-out images themselves, in order.
    for (k, index) in [(0, 0), (1, 2), (8, 16), (11, 22)] {
        let want: Vec<u8> = f
            .heldout
            .rows(k..k + 1)
            .iter()
            .map(|&v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
            .collect();
        assert_eq!(
            tile(&img, 16, index, (SIDE, SIDE)),
            want,
            "tile {index} is not held-out image {k}"
        );
    }
    // Odd columns are reconstructions: not blank, not copies of the originals.
    let recon = tile(&img, 16, 1, (SIDE, SIDE));
    assert_ne!(recon, tile(&img, 16, 0, (SIDE, SIDE)));
    let (var, levels) = tile_stats(&img, 2, 16, (SIDE, SIDE));
    assert!(
        var > 0.0 && levels > 10,
        "blank: var {var}, {levels} levels"
    );
}

#[test]
fn traverse_has_a_row_per_dimension_that_meets_at_the_base_point() {
    let f = Fixture::new(4);
    let out = f.path("traverse.png");
    f.run(
        "traverse",
        &[
            "--out",
            out.to_str().unwrap(),
            "--dims",
            "0..3",
            "--steps",
            "5",
            "--range",
            "2.5",
        ],
    );
    let img = open_gray(&out);
    assert_eq!(img.dimensions(), grid_size(3, 5, (SIDE, SIDE)));
    // The middle column is the base point (0) in every row; the ends differ from it.
    let at = |row: u32, col: u32| tile(&img, 5, row * 5 + col, (SIDE, SIDE));
    for row in 1..3 {
        assert_eq!(at(row, 2), at(0, 2), "row {row} misses the base point");
    }
    for row in 0..3 {
        assert_ne!(at(row, 0), at(row, 2), "dimension {row} changes nothing");
        assert_ne!(at(row, 0), at(row, 4));
    }
    // From a held-out example instead of 0: a different base point.
    let from_data = f.path("traverse_data.png");
    f.run(
        "traverse",
        &[
            "--out",
            from_data.to_str().unwrap(),
            "--dims",
            "0..3",
            "--steps",
            "5",
            "--data",
            &f.data,
            "--index",
            "3",
        ],
    );
    let other = open_gray(&from_data);
    assert_eq!(other.dimensions(), img.dimensions());
    assert_ne!(tile(&other, 5, 2, (SIDE, SIDE)), at(0, 2));
    // A dimension the model does not have is refused.
    let refused = f.try_run("traverse", &["--out", "x.png", "--dims", "3,4"]);
    assert!(!refused.status.success());
}

#[test]
fn scatter_colours_points_by_label_with_a_legend() {
    for latent in [2, 5] {
        let f = Fixture::new(latent);
        let out = f.path("scatter.png");
        f.run(
            "scatter",
            &[
                "--data",
                &f.data,
                "--holdout",
                &HOLDOUT.to_string(),
                "--out",
                out.to_str().unwrap(),
                "--n",
                "80",
            ],
        );
        let img = open_rgb(&out);
        assert_eq!(img.dimensions(), (900, 800));
        // The synthetic data has five classes: each legend marker is drawn in its full colour.
        let classes = {
            let mut l = f.heldout.labels.clone().unwrap()[..80].to_vec();
            l.sort_unstable();
            l.dedup();
            l.len()
        };
        assert!(classes >= 3, "the test data should have several classes");
        for (i, c) in PALETTE.iter().enumerate().take(classes) {
            assert!(
                has_colour(&img, *c),
                "latent {latent}: no colour {i} in the legend"
            );
        }
        assert!(distinct_colours(&img) > 20, "latent {latent}: too plain");
    }
}

#[test]
fn evaluate_reproduces_engine_evaluate_bit_for_bit() {
    let f = Fixture::new(3);
    let stdout = f.run(
        "evaluate",
        &[
            "--data",
            &f.data,
            "--holdout",
            &HOLDOUT.to_string(),
            "--iw-samples",
            "5",
            "--json",
        ],
    );
    let got: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    // The seed comes from the model's metadata, as in training.
    let want = f.engine.evaluate(&f.params, f.heldout.pixels(), 5).unwrap();
    assert_eq!(got["seed"], RUN_SEED);
    assert_eq!(got["examples"], HOLDOUT as u64);
    for (key, value) in [
        ("elbo", want.elbo),
        ("recon", want.recon),
        ("kl", want.kl),
        ("iw_bound", want.iw_bound.unwrap()),
    ] {
        let v = got[key].as_f64().unwrap();
        assert!(v.is_finite());
        assert_eq!(v.to_bits(), value.to_bits(), "{key}: {v} vs {value}");
    }
    // Another seed gives other noise, so another ELBO.
    let reseeded: serde_json::Value = serde_json::from_str(
        f.run(
            "evaluate",
            &[
                "--data",
                &f.data,
                "--holdout",
                &HOLDOUT.to_string(),
                "--iw-samples",
                "0",
                "--seed",
                "8",
                "--json",
            ],
        )
        .trim(),
    )
    .unwrap();
    assert_ne!(reseeded["elbo"], got["elbo"]);
    assert!(reseeded["iw_bound"].is_null());
}

#[test]
fn evaluate_defaults_to_the_runs_data_holdout_and_seed() {
    let f = Fixture::new(3);
    // The run's config.json beside the model names the held-out size.
    std::fs::write(
        f.path("config.json"),
        serde_json::json!({ "data": f.data, "holdout": HOLDOUT, "seed": RUN_SEED }).to_string(),
    )
    .unwrap();
    let line = f.run("evaluate", &["--iw-samples", "3"]);
    let want = f.engine.evaluate(&f.params, f.heldout.pixels(), 3).unwrap();
    assert!(
        line.starts_with(&format!("held-out ELBO {:.4} nats/example", want.elbo)),
        "{line}"
    );
    assert!(line.contains(&format!("IW bound (k=3) {:.4}", want.iw_bound.unwrap())));
    assert!(line.contains(&format!("{HOLDOUT} examples")), "{line}");
}

fn write_metrics(path: &Path, epochs: usize) {
    let lines: Vec<String> = (1..=epochs)
        .map(|e| {
            let t = e as f64;
            let mut line = serde_json::json!({
                "epoch": e, "global_step": e * 100, "examples": 6400,
                "train_elbo": -200.0 + 60.0 * t.ln_1p(), "heldout_elbo": -195.0 + 55.0 * t.ln_1p(),
                "recon": -180.0 + 50.0 * t.ln_1p(), "kl": 20.0 + 2.0 * t,
                "heldout_recon": -176.0 + 46.0 * t.ln_1p(), "heldout_kl": 19.0 + 2.1 * t,
                "samples_per_s": 9000.0 + 300.0 * (t * 1.7).sin(), "workers": 2,
            });
            if e == epochs {
                line["heldout_iw_bound"] = serde_json::json!(-150.0);
            }
            line.to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

#[test]
fn plot_draws_four_panels_of_curves_with_legends() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.jsonl");
    write_metrics(&metrics, 6);
    let out = dir.path().join("curves.png");
    let status = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(["plot", "--metrics"])
        .arg(&metrics)
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let img = open_rgb(&out);
    assert_eq!(img.dimensions(), (1200, 900));
    // Train, held-out and IW-bound series each appear in their colour.
    for (i, c) in PALETTE.iter().enumerate().take(3) {
        assert!(has_colour(&img, *c), "no series in colour {i}");
    }
    // Text: dark grey/black glyph pixels well beyond what the axes alone draw.
    let dark = img
        .pixels()
        .filter(|p| p.0.iter().all(|&v| v < 100))
        .count();
    assert!(dark > 5000, "only {dark} dark pixels: labels missing?");

    // A malformed line is an error naming it.
    std::fs::write(&metrics, "{\"epoch\": 1}\nnot json\n").unwrap();
    let failed = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(["plot", "--metrics"])
        .arg(&metrics)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!failed.status.success());
    assert!(String::from_utf8_lossy(&failed.stderr).contains("line 2"));
}

#[test]
fn write_run_images_writes_every_picture_of_a_run() {
    let f = Fixture::new(3);
    let out = f.path("run");
    std::fs::create_dir(&out).unwrap();
    let written =
        coordinator::tools::write_run_images(&out, &f.engine, &f.params, &f.heldout, 0).unwrap();
    let names: Vec<String> = written
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "samples.png",
            "reconstructions.png",
            "traverse.png",
            "scatter.png"
        ]
    );
    assert_eq!(
        open_gray(&out.join("samples.png")).dimensions(),
        grid_size(8, 8, (SIDE, SIDE))
    );
    assert_eq!(
        open_gray(&out.join("reconstructions.png")).dimensions(),
        grid_size(4, 16, (SIDE, SIDE))
    );
    // Three latent dimensions, nine steps.
    assert_eq!(
        open_gray(&out.join("traverse.png")).dimensions(),
        grid_size(3, 9, (SIDE, SIDE))
    );
    // The same samples as the subcommand with the same seed.
    let cli = f.path("cli_samples.png");
    f.run("sample", &["--out", cli.to_str().unwrap(), "--seed", "0"]);
    assert_eq!(open_gray(&cli), open_gray(&out.join("samples.png")));

    write_metrics(&out.join("metrics.jsonl"), 3);
    let written =
        coordinator::tools::write_run_images(&out, &f.engine, &f.params, &f.heldout, 0).unwrap();
    assert_eq!(written.last().unwrap(), &out.join("curves.png"));
    assert_eq!(open_rgb(&out.join("curves.png")).dimensions(), (1200, 900));
}

#[test]
fn a_saved_model_loads_with_the_same_fingerprint() {
    let f = Fixture::new(3);
    let loaded = common::formats::load_model(&f.model).unwrap();
    assert_eq!(
        common::formats::fingerprint(&loaded.params),
        common::formats::fingerprint(&f.params)
    );
    assert_eq!(loaded.config, *f.engine.config());
    assert_eq!(loaded.metadata["seed"], RUN_SEED.to_string());
}

#[test]
fn every_subcommand_explains_itself() {
    for (subcommand, phrase) in [
        ("sample", "prior"),
        ("reconstruct", "reconstruction"),
        ("traverse", "latent dimension"),
        ("scatter", "principal"),
        ("evaluate", "importance-weighted"),
        ("plot", "metrics.jsonl"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_coordinator"))
            .args([subcommand, "--help"])
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{subcommand} --help failed");
        assert!(
            help.contains(phrase),
            "`{subcommand} --help` does not mention {phrase}: {help}"
        );
    }
}
