//! Generates the echo backend's gRPC code (needs `protoc`, Debian's
//! protobuf-compiler, installed by `cargo xtask setup`).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().compile_protos(&["proto/echo.proto"], &["proto"])?;
    Ok(())
}
