//! Datasets end to end: files written to a temporary directory and read back, every malformed
//! case, the held-out split, the range check, the synthetic data, and the MNIST download against a
//! local HTTP server.

use std::path::{Path, PathBuf};

use common::data::{
    DataSource, Dataset, IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, SIDE, Shape, ShapeParams, load_idx,
    load_npy, synthetic, synthetic_with,
};
use common::model::Likelihood;
// The MNIST download and its local HTTP server (the `download` feature).
#[cfg(feature = "download")]
use {
    common::data::{Mnist, MnistFiles, RemoteFile, md5_of_file},
    md5::{Digest, Md5},
    std::collections::HashMap,
    std::io::{BufRead, BufReader, Write},
    std::net::{TcpListener, TcpStream},
    std::sync::Arc,
    std::sync::atomic::{AtomicUsize, Ordering},
};

// ---------------------------------------------------------------------------------------------
// File builders

fn idx_bytes(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = magic.to_be_bytes().to_vec();
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

#[cfg(feature = "gzip")]
fn gzip(bytes: &[u8]) -> Vec<u8> {
    use flate2::{Compression, write::GzEncoder};
    use std::io::Write;
    let mut enc = GzEncoder::new(Vec::new(), Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// A `.npy` file as `numpy.save` writes it (version 1.0, or 2.0 with a 4-byte header length).
fn npy_bytes(descr: &str, fortran: bool, shape: &[usize], data: &[u8], v2: bool) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let fortran = if fortran { "True" } else { "False" };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}");
    let prefix = if v2 { 12 } else { 10 };
    while (prefix + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY".to_vec();
    if v2 {
        out.extend_from_slice(&[2, 0]);
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    } else {
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    }
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn err_text<T: std::fmt::Debug>(r: common::Result<T>) -> String {
    r.unwrap_err().to_string()
}

/// Six 2 x 3 images whose pixel k of image i is `(10 i + k)` and labels 0..6.
fn six_images() -> (Vec<u8>, Vec<u8>) {
    let pixels = (0..6u8)
        .flat_map(|i| (0..6u8).map(move |k| 10 * i + k))
        .collect();
    (pixels, (0..6).collect())
}

// ---------------------------------------------------------------------------------------------
// IDX

#[test]
#[cfg(feature = "gzip")]
fn idx_round_trip_raw_and_gzip_detected_by_content() {
    let dir = tempfile::tempdir().unwrap();
    let (pixels, labels) = six_images();
    let images = idx_bytes(IDX_IMAGES_MAGIC, &[6, 2, 3], &pixels);
    let label_file = idx_bytes(IDX_LABELS_MAGIC, &[6], &labels);
    // Gzipped content under a name without .gz, raw content under a .gz name: content decides.
    let img_gz = write(dir.path(), "images.idx", &gzip(&images));
    let lab_raw = write(dir.path(), "labels.gz", &label_file);
    let spec = format!("idx:{},{}", img_gz.display(), lab_raw.display());
    let data = spec.parse::<DataSource>().unwrap().load().unwrap();

    assert_eq!((data.len(), data.dim(), data.image_shape()), (6, 6, (2, 3)));
    assert_eq!(data.labels.as_deref(), Some(&labels[..]));
    let expected: Vec<f32> = pixels.iter().map(|&p| p as f32 / 255.0).collect();
    assert_eq!(data.pixels().as_slice().unwrap(), &expected[..]);
    assert_eq!(data.rows(5..6)[[0, 2]], 52.0 / 255.0);

    let raw = write(dir.path(), "images-raw", &images);
    assert_eq!(load_idx(&raw, None).unwrap().pixels(), data.pixels());
    assert!(load_idx(&raw, None).unwrap().labels.is_none());
}

#[test]
fn idx_wrong_magic_names_the_file_and_both_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "bad.idx", &idx_bytes(0x0804, &[1, 1, 1], &[0]));
    let msg = err_text(load_idx(&path, None));
    assert!(
        msg.contains("bad.idx") && msg.contains("2052") && msg.contains("2051"),
        "{msg}"
    );

    // A label file passed as the images says what it is.
    let path = write(
        dir.path(),
        "labels.idx",
        &idx_bytes(IDX_LABELS_MAGIC, &[1], &[0]),
    );
    let msg = err_text(load_idx(&path, None));
    assert!(
        msg.contains("labels.idx") && msg.contains("label file"),
        "{msg}"
    );
}

#[test]
#[cfg(feature = "gzip")]
fn idx_truncated_data_reports_expected_and_actual_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (pixels, _) = six_images();
    let short = idx_bytes(IDX_IMAGES_MAGIC, &[6, 2, 3], &pixels[..30]);
    for (name, bytes) in [("short.idx", short.clone()), ("short.idx.gz", gzip(&short))] {
        let path = write(dir.path(), name, &bytes);
        let msg = err_text(load_idx(&path, None));
        assert!(
            msg.contains(name)
                && msg.contains("truncated")
                && msg.contains("36")
                && msg.contains("30"),
            "{msg}"
        );
    }
}

#[test]
#[cfg(feature = "gzip")]
fn idx_truncated_gzip_stream_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (pixels, _) = six_images();
    let mut z = gzip(&idx_bytes(IDX_IMAGES_MAGIC, &[6, 2, 3], &pixels));
    z.truncate(z.len() - 10);
    let path = write(dir.path(), "cut.gz", &z);
    let msg = err_text(load_idx(&path, None));
    assert!(msg.contains("cut.gz") && msg.contains("truncated"), "{msg}");
}

#[test]
fn idx_label_count_mismatch_names_both_files() {
    let dir = tempfile::tempdir().unwrap();
    let (pixels, labels) = six_images();
    let img = write(
        dir.path(),
        "img",
        &idx_bytes(IDX_IMAGES_MAGIC, &[6, 2, 3], &pixels),
    );
    let lab = write(
        dir.path(),
        "lab",
        &idx_bytes(IDX_LABELS_MAGIC, &[5], &labels[..5]),
    );
    let msg = err_text(load_idx(&img, Some(&lab)));
    assert!(
        msg.contains("5 labels") && msg.contains("6 images"),
        "{msg}"
    );
    assert!(msg.contains(&*img.to_string_lossy()) && msg.contains(&*lab.to_string_lossy()));
}

#[test]
fn idx_missing_file_is_an_io_error_naming_it() {
    let msg = err_text(load_idx(Path::new("/nonexistent/images.idx"), None));
    assert!(msg.contains("/nonexistent/images.idx"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// .npy

#[test]
fn npy_round_trip_uint8_images_with_labels() {
    let dir = tempfile::tempdir().unwrap();
    let (pixels, labels) = six_images();
    let img = write(
        dir.path(),
        "x.npy",
        &npy_bytes("|u1", false, &[6, 2, 3], &pixels, false),
    );
    let lab_i64: Vec<u8> = labels
        .iter()
        .flat_map(|&l| i64::from(l).to_le_bytes())
        .collect();
    let lab = write(
        dir.path(),
        "y.npy",
        &npy_bytes("<i8", false, &[6], &lab_i64, true),
    );
    let data = load_npy(&img, Some(&lab)).unwrap();
    assert_eq!((data.len(), data.image_shape()), (6, (2, 3)));
    assert_eq!(data.labels.as_deref(), Some(&labels[..]));
    assert_eq!(data.pixels()[[1, 0]], 10.0 / 255.0);

    let lab_u8 = write(
        dir.path(),
        "y8.npy",
        &npy_bytes("|u1", false, &[6], &labels, false),
    );
    assert_eq!(load_npy(&img, Some(&lab_u8)).unwrap().labels, data.labels);
}

#[test]
fn npy_float32_rows_are_kept_as_is_and_square_rows_become_square_images() {
    let dir = tempfile::tempdir().unwrap();
    let values: Vec<f32> = (0..2 * 16).map(|i| i as f32 * 0.25 - 1.0).collect();
    let path = write(
        dir.path(),
        "f.npy",
        &npy_bytes("<f4", false, &[2, 16], &f32_bytes(&values), true),
    );
    let data = load_npy(&path, None).unwrap();
    assert_eq!(
        (data.len(), data.dim(), data.image_shape()),
        (2, 16, (4, 4))
    );
    assert_eq!(data.pixels().as_slice().unwrap(), &values[..]);
}

#[test]
fn npy_unsupported_dtypes_name_the_file_and_dtype() {
    let dir = tempfile::tempdir().unwrap();
    // Four elements of each type: 8, 16 and 32 bytes of data.
    for (descr, data_len, words) in [
        ("<i2", 8, "not supported"),
        (">f4", 16, "big-endian"),
        ("<c8", 32, "not supported"),
    ] {
        let bytes = npy_bytes(descr, false, &[1, 4], &vec![0; data_len], false);
        let path = write(dir.path(), "d.npy", &bytes);
        let msg = err_text(load_npy(&path, None));
        assert!(
            msg.contains("d.npy") && msg.contains(descr) && msg.contains(words),
            "{msg}"
        );
    }
    // Integer images and float labels are not guessed at either.
    let path = write(
        dir.path(),
        "i.npy",
        &npy_bytes("<i8", false, &[1, 1], &[0; 8], false),
    );
    assert!(err_text(load_npy(&path, None)).contains("<i8"));
    let img = write(
        dir.path(),
        "x.npy",
        &npy_bytes("|u1", false, &[1, 1], &[0], false),
    );
    let lab = write(
        dir.path(),
        "y.npy",
        &npy_bytes("<f4", false, &[1], &[0; 4], false),
    );
    let msg = err_text(load_npy(&img, Some(&lab)));
    assert!(msg.contains("y.npy") && msg.contains("<f4"), "{msg}");
}

#[test]
fn npy_fortran_order_is_rejected_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "f.npy",
        &npy_bytes("|u1", true, &[2, 2], &[0; 4], false),
    );
    let msg = err_text(load_npy(&path, None));
    assert!(
        msg.contains("f.npy") && msg.contains("Fortran order"),
        "{msg}"
    );
}

#[test]
fn npy_bad_header_magic_shape_and_truncation_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("magic.npy", b"NUMPY\x01\x00".to_vec(), "not a .npy file"),
        (
            "version.npy",
            b"\x93NUMPY\x09\x00\x00\x00".to_vec(),
            "version 9.0",
        ),
        (
            "header.npy",
            {
                let mut b = b"\x93NUMPY\x01\x00".to_vec();
                let h = b"{'descr': '<f4', 'shape': (1, 1)}\n";
                b.extend_from_slice(&(h.len() as u16).to_le_bytes());
                b.extend_from_slice(h);
                b.extend_from_slice(&[0; 4]);
                b
            },
            "fortran_order",
        ),
        (
            "cut-header.npy",
            npy_bytes("|u1", false, &[2, 2], &[0; 4], false)[..30].to_vec(),
            "truncated",
        ),
        (
            "short.npy",
            npy_bytes("<f4", false, &[3, 4], &[0; 40], false),
            "48",
        ),
        (
            "long.npy",
            npy_bytes("|u1", false, &[3, 4], &[0; 13], false),
            "trailing",
        ),
        (
            "shape.npy",
            npy_bytes("|u1", false, &[2, 2, 2, 2], &[0; 16], false),
            "[2, 2, 2, 2]",
        ),
        (
            "empty.npy",
            npy_bytes("|u1", false, &[0, 4], &[], false),
            "no pixels",
        ),
    ];
    for (name, bytes, words) in cases {
        let path = write(dir.path(), name, &bytes);
        let msg = err_text(load_npy(&path, None));
        assert!(msg.contains(name) && msg.contains(words), "{name}: {msg}");
    }
}

#[test]
fn npy_labels_must_be_one_byte_values_and_match_the_images() {
    let dir = tempfile::tempdir().unwrap();
    let img = write(
        dir.path(),
        "x.npy",
        &npy_bytes("|u1", false, &[2, 1], &[0, 0], false),
    );
    let big: Vec<u8> = [3i64, 300].iter().flat_map(|v| v.to_le_bytes()).collect();
    let lab = write(
        dir.path(),
        "y.npy",
        &npy_bytes("<i8", false, &[2], &big, false),
    );
    let msg = err_text(load_npy(&img, Some(&lab)));
    assert!(msg.contains("y.npy") && msg.contains("300"), "{msg}");
    let lab = write(
        dir.path(),
        "y3.npy",
        &npy_bytes("|u1", false, &[3], &[0, 1, 2], false),
    );
    let msg = err_text(load_npy(&img, Some(&lab)));
    assert!(
        msg.contains("3 labels") && msg.contains("2 images"),
        "{msg}"
    );
}

// ---------------------------------------------------------------------------------------------
// Held-out split and range check

#[test]
fn holdout_split_takes_the_last_examples() {
    let data = synthetic_with(50, 1);
    let all = data.pixels().to_owned();
    let labels = data.labels.clone().unwrap();
    let (train, held_out) = data.split_holdout(8).unwrap();
    assert_eq!((train.len(), held_out.len()), (42, 8));
    assert_eq!(train.pixels(), all.slice(ndarray::s![..42, ..]));
    assert_eq!(held_out.pixels(), all.slice(ndarray::s![42.., ..]));
    assert_eq!(held_out.labels.as_deref(), Some(&labels[42..]));
    assert_eq!(held_out.image_shape(), (SIDE, SIDE));
}

#[test]
fn holdout_as_large_as_the_data_names_both_numbers() {
    let msg = err_text(synthetic_with(20, 1).split_holdout(20));
    assert!(
        msg.contains("20 examples") && msg.contains("only 20"),
        "{msg}"
    );
    assert!(synthetic_with(20, 1).split_holdout(0).is_err());
}

#[test]
fn check_fits_rejects_out_of_range_data_for_bernoulli_with_its_min_and_max() {
    let values = vec![0.0, 0.5, -0.25, 1.0, 2.5, 0.75];
    let data = Dataset::from_parts(values, 3, (1, 3), None).unwrap();
    let msg = err_text(data.check_fits(&Likelihood::Bernoulli, 3));
    assert!(
        msg.contains("[0, 1]") && msg.contains("-0.25") && msg.contains("2.5"),
        "{msg}"
    );
    data.check_fits(&Likelihood::Gaussian { variance: 1.0 }, 3)
        .unwrap();

    let msg = err_text(data.check_fits(&Likelihood::Gaussian { variance: 1.0 }, 784));
    assert!(msg.contains("784") && msg.contains('3'), "{msg}");

    let nan = Dataset::from_parts(vec![0.0, 0.0, 0.0, f32::NAN], 2, (1, 2), None).unwrap();
    let msg = err_text(nan.check_fits(&Likelihood::Gaussian { variance: 1.0 }, 2));
    assert!(msg.contains("example 1") && msg.contains("NaN"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// Synthetic data

fn bits(data: &Dataset) -> Vec<u32> {
    data.pixels().iter().map(|v| v.to_bits()).collect()
}

#[test]
fn synthetic_is_a_pure_function_of_the_seed_and_index() {
    let a = synthetic_with(300, 5);
    assert_eq!(bits(&a), bits(&synthetic_with(300, 5)));
    assert_eq!(a.labels, synthetic_with(300, 5).labels);
    assert_ne!(bits(&a), bits(&synthetic_with(300, 6)));
    // Keyed by example index: a shorter dataset is a prefix of a longer one.
    let prefix = synthetic_with(100, 5);
    assert_eq!(bits(&prefix), bits(&a)[..100 * SIDE * SIDE]);
}

#[test]
fn synthetic_default_is_70000_images_in_unit_range_with_five_balanced_classes() {
    let data = DataSource::default().load().unwrap();
    assert_eq!(
        (data.len(), data.dim(), data.image_shape()),
        (70_000, 784, (28, 28))
    );
    data.check_fits(&Likelihood::Bernoulli, 784).unwrap();
    let mut counts = [0usize; 5];
    for &l in data.labels.as_ref().unwrap() {
        counts[l as usize] += 1;
    }
    // 14,000 expected per class; binomial sd ~ 106, so 13,500..14,500 is a > 4.7 sd band.
    assert!(
        counts.iter().all(|&c| (13_500..14_500).contains(&c)),
        "{counts:?}"
    );
    assert_eq!(
        bits(&data)[..1000 * 784],
        bits(&synthetic_with(1000, 0))[..]
    );
    assert_eq!(DataSource::default().default_holdout(data.len()), 10_000);
}

#[test]
fn synthetic_images_are_not_blank_and_have_some_bright_pixels() {
    let data = synthetic(3);
    for (i, image) in data.pixels().rows().into_iter().enumerate().take(5000) {
        let ink: f32 = image.sum();
        let bright = image.iter().filter(|&&v| v > 0.5).count();
        // The smallest shape (a short thin bar) covers about 2 * 6.5 * 1.5 ~ 20 pixels.
        assert!(
            ink > 8.0 && bright >= 8,
            "image {i}: ink {ink}, {bright} bright pixels"
        );
        assert!(image.iter().all(|&v| (0.0..=1.0).contains(&v)));
    }
}

#[test]
fn synthetic_classes_look_different() {
    // The same position, size, rotation, stroke and brightness, only the class changes.
    let render = |shape| {
        let mut image = vec![0.0f32; SIDE * SIDE];
        ShapeParams {
            shape,
            center: (14.0, 14.0),
            size: 9.0,
            angle: 0.3,
            stroke: 2.0,
            intensity: 1.0,
        }
        .render(&mut image);
        image
    };
    let images: Vec<Vec<f32>> = Shape::ALL.iter().map(|&s| render(s)).collect();
    for a in 0..images.len() {
        for b in a + 1..images.len() {
            let d2: f32 = images[a]
                .iter()
                .zip(&images[b])
                .map(|(x, y)| (x - y) * (x - y))
                .sum();
            // Outlines 2 pixels wide and ~50 long: distinct shapes disagree on dozens of pixels.
            assert!(
                d2 > 20.0,
                "{:?} vs {:?}: squared distance {d2}",
                Shape::ALL[a],
                Shape::ALL[b]
            );
        }
    }
    // And across the dataset, the average image of each class differs from every other.
    let data = synthetic_with(5000, 2);
    let labels = data.labels.as_ref().unwrap();
    let means: Vec<ndarray::Array1<f32>> = (0..5u8)
        .map(|c| {
            let rows: Vec<usize> = (0..data.len()).filter(|&i| labels[i] == c).collect();
            data.pixels()
                .select(ndarray::Axis(0), &rows)
                .mean_axis(ndarray::Axis(0))
                .unwrap()
        })
        .collect();
    for a in 0..5 {
        for b in a + 1..5 {
            let d2: f32 = (&means[a] - &means[b]).mapv(|v| v * v).sum();
            assert!(
                d2 > 0.05,
                "classes {a} and {b}: mean images differ by only {d2}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// MNIST download, against a local HTTP server

#[cfg(feature = "download")]
/// A minimal HTTP/1.1 server on 127.0.0.1 serving `files` under `/mnist/`, counting requests.
struct FileServer {
    mirror: String,
    requests: Arc<AtomicUsize>,
}

#[cfg(feature = "download")]
impl FileServer {
    fn start(files: HashMap<String, Vec<u8>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mirror = format!("http://{}/mnist/", listener.local_addr().unwrap());
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                counter.fetch_add(1, Ordering::SeqCst);
                let _ = respond(stream, &files);
            }
        });
        FileServer { mirror, requests }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

#[cfg(feature = "download")]
fn respond(stream: TcpStream, files: &HashMap<String, Vec<u8>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" {
            break;
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("");
    let name = path.strip_prefix("/mnist/").unwrap_or("");
    let mut stream = stream;
    match files.get(name) {
        Some(body) => {
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/x-gzip\r\n\
                 Connection: close\r\n\r\n",
                body.len()
            )?;
            stream.write_all(body)?;
        }
        None => write!(
            stream,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?,
    }
    stream.flush()
}

#[cfg(feature = "download")]
fn md5_hex(bytes: &[u8]) -> String {
    hex::encode(Md5::digest(bytes))
}

#[cfg(feature = "download")]
/// A small MNIST look-alike: 12 training and 5 test images of 28 x 28, gzipped IDX, with the
/// served bytes and a file list carrying their checksums.
fn fake_mnist() -> (HashMap<String, Vec<u8>>, MnistFiles) {
    let official = MnistFiles::official();
    let mut served = HashMap::new();
    let mut entry = |file: &RemoteFile, bytes: Vec<u8>| {
        let gz = gzip(&bytes);
        let remote = RemoteFile::new(file.name.clone(), md5_hex(&gz));
        served.insert(file.name.clone(), gz);
        remote
    };
    let images = |n: u32, salt: u32| {
        let pixels: Vec<u8> = (0..n * 784).map(|i| ((i * 7 + salt) % 256) as u8).collect();
        idx_bytes(IDX_IMAGES_MAGIC, &[n, 28, 28], &pixels)
    };
    let labels = |n: u32| {
        idx_bytes(
            IDX_LABELS_MAGIC,
            &[n],
            &(0..n as u8).map(|i| i % 10).collect::<Vec<_>>(),
        )
    };
    let files = MnistFiles {
        train_images: entry(&official.train_images, images(12, 0)),
        train_labels: entry(&official.train_labels, labels(12)),
        test_images: entry(&official.test_images, images(5, 1)),
        test_labels: entry(&official.test_labels, labels(5)),
    };
    (served, files)
}

#[cfg(feature = "download")]
fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".part"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
#[cfg(feature = "download")]
fn mnist_downloads_missing_files_once_then_reuses_them() {
    let (served, files) = fake_mnist();
    let server = FileServer::start(served);
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().join("nested/mnist");
    let mnist = Mnist {
        dir: dir.clone(),
        mirror: server.mirror.clone(),
        files: files.clone(),
    };

    let data = mnist.load().unwrap();
    assert_eq!(server.requests(), 4);
    assert_eq!(
        (data.len(), data.dim(), data.image_shape()),
        (17, 784, (28, 28))
    );
    let labels = data.labels.as_ref().unwrap();
    assert_eq!(&labels[10..14], &[0, 1, 0, 1]); // train labels 10, 11 then test labels 0, 1
    // Row 12 is test image 0, whose pixel k is (7 k + 1) mod 256.
    assert_eq!(data.pixels()[[12, 1]], 8.0 / 255.0);
    for f in files.all() {
        assert_eq!(md5_of_file(&dir.join(&f.name)).unwrap(), f.md5);
    }
    assert!(leftovers(&dir).is_empty());

    let again = mnist.fetch().unwrap();
    assert_eq!((again.downloaded.len(), again.reused.len()), (0, 4));
    let reloaded = mnist.load().unwrap();
    assert_eq!(
        server.requests(),
        4,
        "files already present must not be downloaded again"
    );
    assert_eq!(reloaded.pixels(), data.pixels());
}

#[test]
#[cfg(feature = "download")]
fn mnist_corrupt_file_in_the_cache_is_downloaded_again() {
    let (served, files) = fake_mnist();
    let server = FileServer::start(served);
    let cache = tempfile::tempdir().unwrap();
    let mnist = Mnist {
        dir: cache.path().to_owned(),
        mirror: server.mirror.clone(),
        files,
    };
    mnist.fetch().unwrap();
    let victim = cache.path().join(&mnist.files.test_images.name);
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes.truncate(bytes.len() / 2); // an interrupted copy
    std::fs::write(&victim, &bytes).unwrap();

    let fetched = mnist.fetch().unwrap();
    assert_eq!(
        fetched.downloaded,
        vec![mnist.files.test_images.name.clone()]
    );
    assert_eq!(server.requests(), 5);
    assert_eq!(md5_of_file(&victim).unwrap(), mnist.files.test_images.md5);
}

#[test]
#[cfg(feature = "download")]
fn mnist_wrong_bytes_from_the_mirror_are_rejected_and_not_kept() {
    let (served, mut files) = fake_mnist();
    files.train_labels.md5 = "00000000000000000000000000000000".into();
    let server = FileServer::start(served);
    let cache = tempfile::tempdir().unwrap();
    let mnist = Mnist {
        dir: cache.path().to_owned(),
        mirror: server.mirror,
        files,
    };
    let msg = err_text(mnist.load());
    assert!(
        msg.contains("MD5") && msg.contains("train-labels-idx1-ubyte.gz"),
        "{msg}"
    );
    assert!(!cache.path().join("train-labels-idx1-ubyte.gz").exists());
    assert!(
        leftovers(cache.path()).is_empty(),
        "{:?}",
        leftovers(cache.path())
    );
}

#[test]
#[cfg(feature = "download")]
fn mnist_missing_file_on_the_mirror_names_the_url() {
    let (mut served, files) = fake_mnist();
    served.remove(&files.test_labels.name);
    let server = FileServer::start(served);
    let cache = tempfile::tempdir().unwrap();
    let mnist = Mnist {
        dir: cache.path().to_owned(),
        mirror: server.mirror.clone(),
        files,
    };
    let msg = err_text(mnist.fetch());
    assert!(
        msg.contains(&format!("{}t10k-labels-idx1-ubyte.gz", server.mirror)),
        "{msg}"
    );
    assert!(msg.contains("404"), "{msg}");
}

#[test]
#[cfg(feature = "download")]
fn mnist_unreachable_mirror_says_which_files_to_put_where() {
    // A port that was just free: nothing listens there, so connecting is refused.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().join("mnist");
    let mnist = Mnist {
        dir: dir.clone(),
        mirror: format!("http://127.0.0.1:{port}/mnist"),
        files: MnistFiles::official(),
    };
    let msg = err_text(mnist.load());
    assert!(
        msg.contains(&format!(
            "http://127.0.0.1:{port}/mnist/train-images-idx3-ubyte.gz"
        )),
        "{msg}"
    );
    assert!(msg.contains(&*dir.to_string_lossy()), "{msg}");
    for f in MnistFiles::official().all() {
        assert!(msg.contains(&f.name) && msg.contains(&f.md5), "{msg}");
    }
    assert!(msg.contains("VAE_MNIST_MIRROR"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// Optional: the real MNIST test split, when this machine has a copy (not needed by the suite)

#[cfg(feature = "download")]
fn shared_t10k() -> Option<PathBuf> {
    let dir = std::env::var_os("VAE_MNIST_T10K")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/mnist-t10k")
        });
    dir.join("t10k-images-idx3-ubyte.gz")
        .exists()
        .then_some(dir)
}

#[test]
#[cfg(feature = "download")]
fn real_mnist_test_split_loads_if_present() {
    let Some(dir) = shared_t10k() else {
        eprintln!("skipped: no local copy of the MNIST test split");
        return;
    };
    let official = MnistFiles::official();
    for f in [&official.test_images, &official.test_labels] {
        assert_eq!(
            md5_of_file(&dir.join(&f.name)).unwrap(),
            f.md5,
            "{}",
            f.name
        );
    }
    let spec = format!(
        "idx:{},{}",
        dir.join(&official.test_images.name).display(),
        dir.join(&official.test_labels.name).display()
    );
    let data = spec.parse::<DataSource>().unwrap().load().unwrap();
    assert_eq!(
        (data.len(), data.dim(), data.image_shape()),
        (10_000, 784, (28, 28))
    );
    assert_eq!(&data.labels.as_ref().unwrap()[..5], &[7, 2, 1, 0, 4]);
    data.check_fits(&Likelihood::Bernoulli, 784).unwrap();
    let (train, held_out) = data.split_holdout(1000).unwrap();
    assert_eq!((train.len(), held_out.len()), (9000, 1000));
}
