//! `vinfra`: one binary for the control plane, node agents, the CLI and benchmarks.
fn main() {
    println!("vinfra");
}
