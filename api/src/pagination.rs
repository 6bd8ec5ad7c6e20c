//! Page-number pagination shared by every list.

use poem_openapi::{
    types::{ParseFromJSON, ToJSON},
    Object,
};

/// Default number of items per page.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// Largest page size accepted.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// One page of a list, newest first.
#[derive(Debug, Object)]
pub struct Page<T: ParseFromJSON + ToJSON> {
    /// The items of this page.
    pub items: Vec<T>,
    /// This page's number, from 1.
    pub page: u32,
    /// Items per page asked for.
    pub page_size: u32,
    /// Items in the whole list.
    pub total: i64,
}

/// The `page` and `page_size` of a request, already range-checked by the operation's
/// parameter validators (1.. and 1..=1000).
#[derive(Debug, Clone, Copy)]
pub struct PageParams {
    /// Page number, from 1.
    pub page: u32,
    /// Items per page.
    pub page_size: u32,
}

impl PageParams {
    /// Applies the defaults.
    pub fn new(page: Option<u32>, page_size: Option<u32>) -> Self {
        Self {
            page: page.unwrap_or(1).max(1),
            page_size: page_size
                .unwrap_or(DEFAULT_PAGE_SIZE)
                .clamp(1, MAX_PAGE_SIZE),
        }
    }

    /// SQL `LIMIT`.
    pub fn limit(&self) -> i64 {
        i64::from(self.page_size)
    }

    /// SQL `OFFSET`.
    pub fn offset(&self) -> i64 {
        (i64::from(self.page) - 1) * i64::from(self.page_size)
    }

    /// Wraps the items of this page.
    pub fn page<T: ParseFromJSON + ToJSON>(&self, items: Vec<T>, total: i64) -> Page<T> {
        Page {
            items,
            page: self.page,
            page_size: self.page_size,
            total,
        }
    }
}
