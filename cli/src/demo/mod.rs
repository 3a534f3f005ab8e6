//! `weft demo`: the mesh on this machine, end to end.
//!
//! As root with the network tools present, the full local mesh
//! ([`mesh`]): pods in network namespaces made by the CNI plugins, captured
//! by nftables, carried between two simulated nodes in HBONE. Otherwise the
//! loopback variant ([`loopback`]), after saying why.

pub mod l7;
pub mod loopback;
pub mod mesh;
pub mod topology;
pub mod waypoint;

#[allow(clippy::print_stdout)]
pub async fn run(keep: bool) -> anyhow::Result<()> {
    match mesh::missing_prerequisite() {
        None => mesh::run(keep).await,
        Some(why) => {
            println!("note: running the loopback variant: {why}\n");
            loopback::run(keep).await
        }
    }
}
