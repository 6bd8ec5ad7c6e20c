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

/// One equality filter of a [`Listing`].
enum Filter<'a> {
    Uuid(&'static str, uuid::Uuid),
    Text(&'static str, &'a str),
    /// Any of the columns contains the pattern (already a `%...%` LIKE pattern).
    Contains(&'static [&'static str], String),
    /// The time `column` compared (`>=` or `<`) with the value.
    Time(&'static str, &'static str, chrono::DateTime<chrono::Utc>),
    /// `column IS NULL` (true) or `IS NOT NULL` (false).
    Null(&'static str, bool),
}

/// The `ILIKE` pattern matching text that contains `needle` literally.
fn contains_pattern(needle: &str) -> String {
    let mut pattern = String::with_capacity(needle.len() + 2);
    pattern.push('%');
    for c in needle.chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

/// A paginated list of rows of one table (or view), newest first, optionally limited to
/// one tenant and filtered by equalities: what every list operation of the API is. The
/// count and the page are two statements over the same filters.
pub struct Listing<'a> {
    from: &'static str,
    columns: &'static str,
    order: &'static str,
    filters: Vec<Filter<'a>>,
}

impl<'a> Listing<'a> {
    /// Rows of `from` (a table, with an alias if `columns` uses one), as `columns`, in
    /// `order` (an `ORDER BY` list ending in a unique key, so pages never overlap).
    pub fn new(from: &'static str, columns: &'static str, order: &'static str) -> Self {
        Self {
            from,
            columns,
            order,
            filters: Vec::new(),
        }
    }

    /// Only rows whose `column` equals `value`, when there is one.
    pub fn uuid(mut self, column: &'static str, value: Option<uuid::Uuid>) -> Self {
        if let Some(v) = value {
            self.filters.push(Filter::Uuid(column, v));
        }
        self
    }

    /// Only rows whose text `column` equals `value`, when there is one.
    pub fn text(mut self, column: &'static str, value: Option<&'a str>) -> Self {
        if let Some(v) = value {
            self.filters.push(Filter::Text(column, v));
        }
        self
    }

    /// Only rows whose time `column` is at or after `from` and before `to`, for those
    /// given.
    pub fn between(
        mut self,
        column: &'static str,
        from: Option<chrono::DateTime<chrono::Utc>>,
        to: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Self {
        if let Some(from) = from {
            self.filters.push(Filter::Time(column, " >= ", from));
        }
        if let Some(to) = to {
            self.filters.push(Filter::Time(column, " < ", to));
        }
        self
    }

    /// Only rows whose `column` is null (`Some(true)`) or not (`Some(false)`).
    pub fn null(mut self, column: &'static str, null: Option<bool>) -> Self {
        if let Some(null) = null {
            self.filters.push(Filter::Null(column, null));
        }
        self
    }

    /// Only rows where one of the text `columns` contains `q` (case-insensitive), when
    /// `q` is given and not blank. Served by the columns' trigram indexes. 422 for a `q`
    /// PostgreSQL cannot hold (a NUL character).
    pub fn search(
        mut self,
        columns: &'static [&'static str],
        q: Option<&str>,
    ) -> crate::error::ApiResult<Self> {
        if let Some(q) = q.map(str::trim).filter(|q| !q.is_empty()) {
            if q.contains('\0') {
                return Err(crate::error::ApiError::validation(
                    "q",
                    "q must not contain a NUL character",
                ));
            }
            self.filters
                .push(Filter::Contains(columns, contains_pattern(q)));
        }
        Ok(self)
    }

    fn query(&self, head: &str) -> sqlx::QueryBuilder<sqlx::Postgres> {
        let mut q = sqlx::QueryBuilder::new(head);
        q.push(" FROM ").push(self.from);
        for (k, filter) in self.filters.iter().enumerate() {
            q.push(if k == 0 { " WHERE " } else { " AND " });
            match filter {
                Filter::Uuid(column, v) => q.push(column).push(" = ").push_bind(*v),
                Filter::Text(column, v) => q.push(column).push(" = ").push_bind(*v),
                Filter::Time(column, op, v) => q.push(column).push(op).push_bind(*v),
                Filter::Null(column, true) => q.push(column).push(" IS NULL"),
                Filter::Null(column, false) => q.push(column).push(" IS NOT NULL"),
                Filter::Contains(columns, pattern) => {
                    q.push("(");
                    for (i, column) in columns.iter().enumerate() {
                        if i > 0 {
                            q.push(" OR ");
                        }
                        q.push(*column).push(" ILIKE ").push_bind(pattern.clone());
                    }
                    q.push(")")
                }
            };
        }
        q
    }

    /// The page `params` asks for, its rows turned into `T`.
    pub async fn page<R, T>(
        self,
        pg: &sqlx::PgPool,
        params: PageParams,
    ) -> crate::error::ApiResult<Page<T>>
    where
        R: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin + Into<T>,
        T: ParseFromJSON + ToJSON,
    {
        let total: i64 = self
            .query("SELECT count(*)")
            .build_query_scalar()
            .fetch_one(pg)
            .await?;
        let mut q = self.query(&format!("SELECT {}", self.columns));
        q.push(" ORDER BY ")
            .push(self.order)
            .push(" LIMIT ")
            .push_bind(params.limit())
            .push(" OFFSET ")
            .push_bind(params.offset());
        let rows: Vec<R> = q.build_query_as().fetch_all(pg).await?;
        Ok(params.page(rows.into_iter().map(Into::into).collect(), total))
    }
}

#[cfg(test)]
mod tests {
    use super::contains_pattern;

    #[test]
    fn a_search_matches_its_text_literally() {
        assert_eq!(contains_pattern("cold room"), "%cold room%");
        assert_eq!(contains_pattern("50%_a\\b"), "%50\\%\\_a\\\\b%");
    }
}
