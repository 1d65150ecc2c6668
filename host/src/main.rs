//! The `portcullis` binary: the command line lives in the library
//! (`portcullis::cli`), where its parts can be tested.

fn main() {
    portcullis::cli::main()
}
