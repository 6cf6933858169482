//! `tynamo`: the server, the local demo cluster and the operator commands.

fn main() {
    eprintln!("tynamo: the server is not written yet (issue: the server)");
    std::process::exit(2);
}
