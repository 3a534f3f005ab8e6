//! Generates the protobuf and gRPC code with protox, a pure-Rust compiler, so a
//! fresh machine needs only cargo (no system protoc).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/istio/ca.proto",
        "proto/envoy/discovery.proto",
        "proto/weft/v1/config.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
