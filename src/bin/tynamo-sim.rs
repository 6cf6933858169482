//! `tynamo-sim`: runs the seeded simulator over many seeds.

fn main() {
    eprintln!("tynamo-sim: the simulator is not written yet");
    std::process::exit(2);
}
