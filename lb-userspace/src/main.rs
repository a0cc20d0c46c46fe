fn main() {
    let lb = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));
    println!("{}", lb.len());
}
