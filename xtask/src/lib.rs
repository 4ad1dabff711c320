pub mod flood;
