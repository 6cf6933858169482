//! tynamo-bench: not yet written.
fn main() {
    eprintln!("tynamo-bench: not written yet");
    std::process::exit(2);
}
