//! Compiles `proto/trainer.proto` with protox (pure Rust): no `protoc` needed on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/trainer.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        // Tensors as `bytes::Bytes`: parameters are shared across workers without copies.
        .bytes(".")
        .compile_fds(descriptors)?;
    Ok(())
}
