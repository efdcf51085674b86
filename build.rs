// Migrations are embedded with include_dir; editing one must rebuild.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
