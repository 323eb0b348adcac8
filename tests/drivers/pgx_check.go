// pgx v4 (Go) through pgmux: each client connects on its own, in one of pgx's four ways of
// running a statement, so their messages differ:
//   - prepare: the default statement cache, named statements (lrupsc_N_M) prepared with
//     Parse/Describe/Sync, then Bind/Execute; a small cache so it evicts them with a simple
//     `deallocate lrupsc_N_M`, between transactions and inside them;
//   - describe: the describe cache: an unnamed Parse/Describe/Sync once per text, then an
//     unnamed Parse/Bind/Execute each time;
//   - simple: PreferSimpleProtocol, arguments inlined into simple Queries;
//   - nocache: no cache (statement_cache_capacity=0): an unnamed Parse/Describe/Sync, then
//     Bind/Execute/Sync of the unnamed statement, a unit of its own after its Parse's Sync
//     (a PostgreSQL session keeps the unnamed statement until the next unnamed Parse).
//
// Each also sends batches (one Sync behind many statements, reads before writes, a failing one
// in the middle), explicit transactions (committed, rolled back, failed), COPY (pgx sends its
// CopyData without waiting for CopyInResponse), its own named statements (deallocated with a
// quoted name), errors that must leave the connection usable, many rows streamed; then a
// pgxpool runs many goroutines on a few connections. Error paths: large COPYs refused early
// (pgx's writer goroutine still sending after its CopyDone) or failed by the source
// (CopyFail), batches failing part way and one whose write must reach the primary,
// CancelRequest and statement_timeout on a read and a COPY TO, and connections pgx closes in
// the middle of a statement (a context deadline, a COPY TO whose writer fails). Every result
// is checked; exits non-zero on any wrong result or error. The tables are dropped and created
// here.
// Usage: pgx_check CONNSTRING CLIENTS
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/jackc/pgconn"
	"github.com/jackc/pgconn/stmtcache"
	"github.com/jackc/pgx/v4"
	"github.com/jackc/pgx/v4/pgxpool"
)

const (
	items = "pgx_check_items"
	copyT = "pgx_check_copy"
	// the statement caches hold this many texts: the checks use more, so they evict
	cacheCap = 4
	// rows each client copies
	copyRows = 500
	// rows streamed from generate_series
	streamRows = 20000
	// rows of the COPYs the server refuses early, so pgx is still sending when it does
	bigCopyRows = 20000
	// a deadline for waits on a condition (a cancel taking effect); never reached when all is well
	waitLimit = 60 * time.Second
)

var modes = []string{"prepare", "describe", "simple", "nocache"}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: pgx_check CONNSTRING CLIENTS")
		os.Exit(2)
	}
	connStr := os.Args[1]
	clients, err := strconv.Atoi(os.Args[2])
	if err != nil {
		fail("CLIENTS: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Second)
	defer cancel()

	if err := setup(ctx, connStr); err != nil {
		fail("setup: %v", err)
	}

	errs := make([]error, clients)
	var wg sync.WaitGroup
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			errs[i] = worker(ctx, connStr, i)
		}(i)
	}
	wg.Wait()
	failed := 0
	for i, err := range errs {
		if err != nil {
			failed++
			if failed <= 10 {
				fmt.Printf("client %d (%s): %v\n", i, modes[i%len(modes)], err)
			}
		}
	}
	if failed > 0 {
		fmt.Printf("%d of %d clients failed\n", failed, clients)
		os.Exit(1)
	}

	if err := totals(ctx, connStr, clients); err != nil {
		fail("totals: %v", err)
	}
	if err := pool(ctx, connStr, clients); err != nil {
		fail("pgxpool: %v", err)
	}
	fmt.Printf("pgx v4: %d clients ok\n", clients)
}

func fail(format string, args ...interface{}) {
	fmt.Printf(format+"\n", args...)
	os.Exit(1)
}

func setup(ctx context.Context, connStr string) error {
	c, err := pgx.Connect(ctx, connStr)
	if err != nil {
		return err
	}
	defer c.Close(ctx)
	_, err = c.Exec(ctx, fmt.Sprintf(
		"DROP TABLE IF EXISTS %[1]s; DROP TABLE IF EXISTS %[2]s; "+
			"CREATE TABLE %[1]s (c int, k int, v text, PRIMARY KEY (c, k)); "+
			"CREATE TABLE %[2]s (c int, n int, s text NOT NULL)", items, copyT))
	return err
}

func worker(ctx context.Context, connStr string, i int) error {
	cfg, err := pgx.ParseConfig(connStr)
	if err != nil {
		return err
	}
	switch modes[i%len(modes)] {
	case "prepare":
		cfg.BuildStatementCache = func(pc *pgconn.PgConn) stmtcache.Cache {
			return stmtcache.New(pc, stmtcache.ModePrepare, cacheCap)
		}
	case "describe":
		cfg.BuildStatementCache = func(pc *pgconn.PgConn) stmtcache.Cache {
			return stmtcache.New(pc, stmtcache.ModeDescribe, cacheCap)
		}
	case "simple":
		cfg.PreferSimpleProtocol = true
	case "nocache":
		cfg.BuildStatementCache = nil
	}
	c, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer c.Close(ctx)

	// a write first: through replicas, this client's later reads of the tables (created by
	// another connection) then find them, as pgmux has it read its own writes
	steps := []struct {
		name string
		run  func(context.Context, *pgx.Conn, int) error
	}{
		{"writes", writes},
		{"parameters", parameters},
		{"stream", stream},
		{"errors", errorsLeaveConnUsable},
		{"transactions", transactions},
		{"batches", batches},
		{"copy", copyFrom},
		{"copy failures", copyFailures},
		{"batch failures", batchFailures},
		{"cancels and timeouts", cancelsAndTimeouts},
		{"abandoned connections", func(ctx context.Context, _ *pgx.Conn, i int) error { return abandoned(ctx, cfg, i) }},
		{"named statements", named},
		{"own rows", ownRows},
	}
	for _, s := range steps {
		if err := s.run(ctx, c, i); err != nil {
			return fmt.Errorf("%s: %w", s.name, err)
		}
	}
	return nil
}

// itemsPerClient is what each client leaves in pgx_check_items: k 0..9 (writes), 100
// (a committed transaction), 200 (a batch), 300 (a batch in a transaction).
const itemsPerClient = 13

func writes(ctx context.Context, c *pgx.Conn, i int) error {
	for k := 0; k < 10; k++ {
		tag, err := c.Exec(ctx, "INSERT INTO "+items+" (c, k, v) VALUES ($1, $2, $3)", i, k, fmt.Sprintf("v%d-%d", i, k))
		if err != nil {
			return err
		}
		if tag.String() != "INSERT 0 1" {
			return fmt.Errorf("insert tag %q", tag)
		}
	}
	return nil
}

// distinct runs more distinct texts than the cache holds (prepare mode: each eviction sends a
// `deallocate`), twice so evicted ones come back.
func distinct(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...interface{}) pgx.Row
}, i int) error {
	for round := 0; round < 2; round++ {
		for k := 0; k < cacheCap*3; k++ {
			var got int
			if err := q.QueryRow(ctx, fmt.Sprintf("SELECT $1::int + %d", k), i).Scan(&got); err != nil {
				return fmt.Errorf("distinct %d: %w", k, err)
			}
			if got != i+k {
				return fmt.Errorf("distinct %d: got %d, want %d", k, got, i+k)
			}
		}
	}
	return nil
}

func parameters(ctx context.Context, c *pgx.Conn, i int) error {
	for j := 0; j < 30; j++ {
		var n int
		var s string
		if err := c.QueryRow(ctx, "SELECT $1::int * 2, $2::text", i*100+j, fmt.Sprintf("w%d", i)).Scan(&n, &s); err != nil {
			return err
		}
		if n != (i*100+j)*2 || s != fmt.Sprintf("w%d", i) {
			return fmt.Errorf("got (%d, %q) for %d", n, s, i*100+j)
		}
	}
	return distinct(ctx, c, i)
}

func stream(ctx context.Context, c *pgx.Conn, i int) error {
	rows, err := c.Query(ctx, "SELECT k, v FROM "+items+" WHERE c = $1 ORDER BY k", i)
	if err != nil {
		return err
	}
	k := 0
	for rows.Next() {
		var gotK int
		var v string
		if err := rows.Scan(&gotK, &v); err != nil {
			rows.Close()
			return err
		}
		if gotK != k || v != fmt.Sprintf("v%d-%d", i, k) {
			rows.Close()
			return fmt.Errorf("row %d: (%d, %q)", k, gotK, v)
		}
		k++
	}
	if err := rows.Err(); err != nil {
		return err
	}
	if k != 10 {
		return fmt.Errorf("%d rows of own items, want 10", k)
	}

	rows, err = c.Query(ctx, "SELECT g, repeat('x', g % 100) FROM generate_series(1, $1::int) g", streamRows)
	if err != nil {
		return err
	}
	var count, sum, chars int64
	for rows.Next() {
		var g int64
		var s string
		if err := rows.Scan(&g, &s); err != nil {
			rows.Close()
			return err
		}
		count++
		sum += g
		chars += int64(len(s))
	}
	if err := rows.Err(); err != nil {
		return err
	}
	var wantChars int64
	for g := int64(1); g <= streamRows; g++ {
		wantChars += g % 100
	}
	if count != streamRows || sum != streamRows*(streamRows+1)/2 || chars != wantChars {
		return fmt.Errorf("streamed %d rows, sum %d, %d chars", count, sum, chars)
	}
	return nil
}

func pgCode(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code
	}
	return ""
}

// wantCode: err is PostgreSQL's error `code`.
func wantCode(err error, code, what string) error {
	if got := pgCode(err); got != code {
		return fmt.Errorf("%s: want error %s, got %v", what, code, err)
	}
	return nil
}

// usable: the connection still answers, and with the right value.
func usable(ctx context.Context, c *pgx.Conn, i int, after string) error {
	var got int
	if err := c.QueryRow(ctx, "SELECT $1::int", i).Scan(&got); err != nil || got != i {
		return fmt.Errorf("after %s: got %d, %v", after, got, err)
	}
	return nil
}

func countOwn(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...interface{}) pgx.Row
}, i int) (int, error) {
	var n int
	err := q.QueryRow(ctx, "SELECT count(*) FROM "+items+" WHERE c = $1", i).Scan(&n)
	return n, err
}

func errorsLeaveConnUsable(ctx context.Context, c *pgx.Conn, i int) error {
	var x int
	err := c.QueryRow(ctx, "SELECT 10 / $1::int", 0).Scan(&x)
	if e := wantCode(err, "22012", "division by zero"); e != nil {
		return e
	}
	if err := usable(ctx, c, i, "division by zero"); err != nil {
		return err
	}
	_, err = c.Exec(ctx, "INSERT INTO "+items+" (c, k, v) VALUES ($1, $2, $3)", i, 0, "dup")
	if e := wantCode(err, "23505", "duplicate key"); e != nil {
		return e
	}
	if err := usable(ctx, c, i, "unique violation"); err != nil {
		return err
	}
	// refused at Parse, where the cached modes prepare it
	err = c.QueryRow(ctx, "SELECT $1::int FROM pgx_check_no_such_table", i).Scan(&x)
	if e := wantCode(err, "42P01", "missing table"); e != nil {
		return e
	}
	if n, err := countOwn(ctx, c, i); err != nil || n != 10 {
		return fmt.Errorf("after errors: %d own rows, %v", n, err)
	}
	return nil
}

func transactions(ctx context.Context, c *pgx.Conn, i int) error {
	insert := "INSERT INTO " + items + " (c, k, v) VALUES ($1, $2, $3)"

	// committed, with cache evictions inside it
	tx, err := c.Begin(ctx)
	if err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, insert, i, 100, "tx"); err != nil {
		return err
	}
	if n, err := countOwn(ctx, tx, i); err != nil || n != 11 {
		return fmt.Errorf("in transaction: %d own rows, %v", n, err)
	}
	if err := distinct(ctx, tx, i); err != nil {
		return fmt.Errorf("in transaction: %w", err)
	}
	if err := tx.Commit(ctx); err != nil {
		return err
	}
	if n, err := countOwn(ctx, c, i); err != nil || n != 11 {
		return fmt.Errorf("after commit: %d own rows, %v", n, err)
	}

	// rolled back
	tx, err = c.Begin(ctx)
	if err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, insert, i, 101, "rolled back"); err != nil {
		return err
	}
	if n, err := countOwn(ctx, tx, i); err != nil || n != 12 {
		return fmt.Errorf("before rollback: %d own rows, %v", n, err)
	}
	if err := tx.Rollback(ctx); err != nil {
		return err
	}
	if n, err := countOwn(ctx, c, i); err != nil || n != 11 {
		return fmt.Errorf("after rollback: %d own rows, %v", n, err)
	}

	// a statement fails at execution: the transaction is aborted until the rollback
	tx, err = c.Begin(ctx)
	if err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, insert, i, 102, "aborted"); err != nil {
		return err
	}
	var x int
	err = tx.QueryRow(ctx, "SELECT 10 / $1::int", 0).Scan(&x)
	if e := wantCode(err, "22012", "division by zero in transaction"); e != nil {
		return e
	}
	_, err = tx.Exec(ctx, insert, i, 103, "aborted")
	if e := wantCode(err, "25P02", "statement in failed transaction"); e != nil {
		return e
	}
	if err := tx.Rollback(ctx); err != nil {
		return err
	}
	if err := usable(ctx, c, i, "failed transaction"); err != nil {
		return err
	}

	// one fails at Parse (prepare modes) inside a transaction
	tx, err = c.Begin(ctx)
	if err != nil {
		return err
	}
	_, err = tx.Exec(ctx, "INSERT INTO pgx_check_no_such_table VALUES ($1)", i)
	if e := wantCode(err, "42P01", "missing table in transaction"); e != nil {
		return e
	}
	if err := tx.Rollback(ctx); err != nil {
		return err
	}
	if n, err := countOwn(ctx, c, i); err != nil || n != 11 {
		return fmt.Errorf("after failed transactions: %d own rows, %v", n, err)
	}
	return nil
}

func batches(ctx context.Context, c *pgx.Conn, i int) error {
	// a read ahead of the writes, all behind one Sync: more distinct texts than the cache
	// holds, so the prepare mode sends these unnamed
	b := &pgx.Batch{}
	b.Queue("SELECT count(*) FROM "+items+" WHERE c = $1", i)
	b.Queue("INSERT INTO "+items+" (c, k, v) VALUES ($1, $2, $3)", i, 200, "batch")
	b.Queue("UPDATE "+items+" SET v = $1 WHERE c = $2 AND k = $3", "batch2", i, 200)
	b.Queue("SELECT v FROM "+items+" WHERE c = $1 AND k = $2", i, 200)
	b.Queue("SELECT $1::int * 3", i)
	br := c.SendBatch(ctx, b)
	var n, triple int
	var v string
	if err := br.QueryRow().Scan(&n); err != nil || n != 11 {
		br.Close()
		return fmt.Errorf("count in batch: %d, %v", n, err)
	}
	if tag, err := br.Exec(); err != nil || tag.String() != "INSERT 0 1" {
		br.Close()
		return fmt.Errorf("insert in batch: %q, %v", tag, err)
	}
	if tag, err := br.Exec(); err != nil || tag.String() != "UPDATE 1" {
		br.Close()
		return fmt.Errorf("update in batch: %q, %v", tag, err)
	}
	if err := br.QueryRow().Scan(&v); err != nil || v != "batch2" {
		br.Close()
		return fmt.Errorf("select in batch: %q, %v", v, err)
	}
	if err := br.QueryRow().Scan(&triple); err != nil || triple != 3*i {
		br.Close()
		return fmt.Errorf("triple in batch: %d, %v", triple, err)
	}
	if err := br.Close(); err != nil {
		return err
	}

	// reads only, one text many times (prepared by name in the prepare mode)
	b = &pgx.Batch{}
	for k := 0; k < 10; k++ {
		b.Queue("SELECT $1::int * 2 + $2::int", i, k)
	}
	br = c.SendBatch(ctx, b)
	for k := 0; k < 10; k++ {
		var got int
		if err := br.QueryRow().Scan(&got); err != nil || got != 2*i+k {
			br.Close()
			return fmt.Errorf("read batch %d: %d, %v", k, got, err)
		}
	}
	if err := br.Close(); err != nil {
		return err
	}

	// one fails in the middle: what follows it up to the Sync is skipped
	b = &pgx.Batch{}
	b.Queue("SELECT $1::int + 1", i)
	b.Queue("SELECT 10 / $1::int", 0)
	b.Queue("SELECT $1::int + 2", i)
	br = c.SendBatch(ctx, b)
	var got int
	if err := br.QueryRow().Scan(&got); err != nil || got != i+1 {
		br.Close()
		return fmt.Errorf("before the failure in a batch: %d, %v", got, err)
	}
	if e := wantCode(br.QueryRow().Scan(&got), "22012", "failure in a batch"); e != nil {
		br.Close()
		return e
	}
	if err := br.QueryRow().Scan(&got); err == nil {
		br.Close()
		return fmt.Errorf("statement after a failure in a batch ran: %d", got)
	}
	br.Close()
	if err := usable(ctx, c, i, "a failed batch"); err != nil {
		return err
	}

	// a batch inside a transaction
	tx, err := c.Begin(ctx)
	if err != nil {
		return err
	}
	b = &pgx.Batch{}
	b.Queue("INSERT INTO "+items+" (c, k, v) VALUES ($1, $2, $3)", i, 300, "tx batch")
	b.Queue("SELECT count(*) FROM "+items+" WHERE c = $1", i)
	br = tx.SendBatch(ctx, b)
	if _, err := br.Exec(); err != nil {
		br.Close()
		return fmt.Errorf("insert in a transaction's batch: %w", err)
	}
	if err := br.QueryRow().Scan(&n); err != nil || n != 13 {
		br.Close()
		return fmt.Errorf("count in a transaction's batch: %d, %v", n, err)
	}
	if err := br.Close(); err != nil {
		return err
	}
	return tx.Commit(ctx)
}

func copyFrom(ctx context.Context, c *pgx.Conn, i int) error {
	rows := make([][]interface{}, copyRows)
	for n := range rows {
		rows[n] = []interface{}{i, n, fmt.Sprintf("s%d", n)}
	}
	copied, err := c.CopyFrom(ctx, pgx.Identifier{copyT}, []string{"c", "n", "s"}, pgx.CopyFromRows(rows))
	if err != nil {
		return err
	}
	if copied != copyRows {
		return fmt.Errorf("copied %d rows", copied)
	}
	var count, sum int
	if err := c.QueryRow(ctx, "SELECT count(*), sum(n) FROM "+copyT+" WHERE c = $1", i).Scan(&count, &sum); err != nil {
		return err
	}
	if count != copyRows || sum != copyRows*(copyRows-1)/2 {
		return fmt.Errorf("after copy: %d rows, sum %d", count, sum)
	}

	// the server refuses a row (s is NOT NULL) while pgx is still sending: nothing is copied
	bad := [][]interface{}{{i, -1, "ok"}, {i, -2, nil}, {i, -3, "ok"}}
	_, err = c.CopyFrom(ctx, pgx.Identifier{copyT}, []string{"c", "n", "s"}, pgx.CopyFromRows(bad))
	if e := wantCode(err, "23502", "NULL in a NOT NULL column"); e != nil {
		return e
	}
	if err := c.QueryRow(ctx, "SELECT count(*) FROM "+copyT+" WHERE c = $1", i).Scan(&count); err != nil || count != copyRows {
		return fmt.Errorf("after a failed copy: %d rows, %v", count, err)
	}
	return nil
}

func named(ctx context.Context, c *pgx.Conn, i int) error {
	// the same name in every client
	const name = "pgx_named"
	if _, err := c.Prepare(ctx, name, "SELECT $1::text || $2::int"); err != nil {
		return err
	}
	for j := 0; j < 5; j++ {
		if modes[i%len(modes)] == "describe" {
			// pgx v4's Query with the describe cache sends the name as the statement's text
			// (a syntax error, without pgmux too); its Exec runs the named statement
			tag, err := c.Exec(ctx, name, "n", i*10+j)
			if err != nil || tag.String() != "SELECT 1" {
				return fmt.Errorf("named: %q, %v", tag, err)
			}
			continue
		}
		var s string
		if err := c.QueryRow(ctx, name, "n", i*10+j).Scan(&s); err != nil || s != fmt.Sprintf("n%d", i*10+j) {
			return fmt.Errorf("named: %q, %v", s, err)
		}
	}
	// sent as `deallocate "pgx_named"`
	if err := c.Deallocate(ctx, name); err != nil {
		return err
	}
	// the name is free again (PostgreSQL refuses a second Parse of a live name with 42P05)
	if _, err := c.Prepare(ctx, name, "SELECT $1::int - 1"); err != nil {
		return fmt.Errorf("prepare after deallocate: %w", err)
	}
	if tag, err := c.Exec(ctx, name, i); err != nil || tag.String() != "SELECT 1" {
		return fmt.Errorf("named after deallocate: %q, %v", tag, err)
	}
	return c.Deallocate(ctx, name)
}

func ownRows(ctx context.Context, c *pgx.Conn, i int) error {
	if n, err := countOwn(ctx, c, i); err != nil || n != itemsPerClient {
		return fmt.Errorf("%d own rows at the end, %v", n, err)
	}
	return nil
}

func totals(ctx context.Context, connStr string, clients int) error {
	c, err := pgx.Connect(ctx, connStr)
	if err != nil {
		return err
	}
	defer c.Close(ctx)
	// this connection wrote nothing: the hint keeps a lagging replica out of it
	var n, copied int
	err = c.QueryRow(ctx, "SELECT (SELECT count(*) FROM "+items+"), (SELECT count(*) FROM "+copyT+") /* pgmux:primary */").Scan(&n, &copied)
	if err != nil {
		return err
	}
	if n != clients*itemsPerClient || copied != clients*copyRows {
		return fmt.Errorf("%d items and %d copied rows, want %d and %d", n, copied, clients*itemsPerClient, clients*copyRows)
	}
	return nil
}

// pool: many goroutines share a few pgxpool connections (each with the default statement cache).
func pool(ctx context.Context, connStr string, clients int) error {
	cfg, err := pgxpool.ParseConfig(connStr)
	if err != nil {
		return err
	}
	cfg.MaxConns = 5
	p, err := pgxpool.ConnectConfig(ctx, cfg)
	if err != nil {
		return err
	}
	defer p.Close()
	errs := make(chan error, clients*2)
	var wg sync.WaitGroup
	for g := 0; g < clients*2; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for j := 0; j < 10; j++ {
				var got int
				if err := p.QueryRow(ctx, "SELECT $1::int * 1000 + $2::int", g, j).Scan(&got); err != nil || got != g*1000+j {
					errs <- fmt.Errorf("goroutine %d: %d, %v", g, got, err)
					return
				}
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		return err
	}
	return nil
}

// copyRowsSource yields rows (i, n, "s") for n from 0; a nil s at badAt (refused by the
// server), or an error of its own at failAt (pgx then sends CopyFail); -1 for neither. With
// endless it never ends: only the context stops it.
type copyRowsSource struct {
	i, n, rows, badAt, failAt int
	endless                   bool
}

var errGiveUp = errors.New("the client gives up")

func (s *copyRowsSource) Next() bool {
	if s.n == s.failAt || (!s.endless && s.n >= s.rows) {
		return false
	}
	s.n++
	return true
}

func (s *copyRowsSource) Values() ([]interface{}, error) {
	n := s.n - 1
	if n == s.badAt {
		return []interface{}{s.i, -n, nil}, nil
	}
	return []interface{}{s.i, -n, "bad copy"}, nil
}

func (s *copyRowsSource) Err() error {
	if s.failAt >= 0 && s.n == s.failAt {
		return errGiveUp
	}
	return nil
}

func ownCopied(ctx context.Context, c *pgx.Conn, i int) error {
	var count int
	if err := c.QueryRow(ctx, "SELECT count(*) FROM "+copyT+" WHERE c = $1", i).Scan(&count); err != nil || count != copyRows {
		return fmt.Errorf("%d copied rows, %v", count, err)
	}
	return nil
}

// copyFailures: COPYs that fail part way, the connection usable after each and nothing of
// them in the table.
func copyFailures(ctx context.Context, c *pgx.Conn, i int) error {
	cols := []string{"c", "n", "s"}
	// a bad row early in a large stream: pgx's writer goroutine is still sending CopyData
	// when the error comes back, and goes on after its CopyDone
	for round := 0; round < 3; round++ {
		src := &copyRowsSource{i: i, rows: bigCopyRows, badAt: 3 + round*50, failAt: -1}
		_, err := c.CopyFrom(ctx, pgx.Identifier{copyT}, cols, src)
		if e := wantCode(err, "23502", "a bad row early in a large COPY"); e != nil {
			return e
		}
		if err := usable(ctx, c, i, "a large COPY refused early"); err != nil {
			return err
		}
	}
	// the source fails half way: pgx sends CopyFail, PostgreSQL answers 57014
	src := &copyRowsSource{i: i, rows: bigCopyRows, badAt: -1, failAt: bigCopyRows / 2}
	_, err := c.CopyFrom(ctx, pgx.Identifier{copyT}, cols, src)
	if e := wantCode(err, "57014", "a COPY the client fails"); e != nil {
		return e
	}
	if err := usable(ctx, c, i, "CopyFail"); err != nil {
		return err
	}
	// the same in a transaction: it fails, a rollback ends it, and a write after it is one
	tx, err := c.Begin(ctx)
	if err != nil {
		return err
	}
	src = &copyRowsSource{i: i, rows: bigCopyRows, badAt: 7, failAt: -1}
	_, err = tx.CopyFrom(ctx, pgx.Identifier{copyT}, cols, src)
	if e := wantCode(err, "23502", "a bad row in a COPY in a transaction"); e != nil {
		tx.Rollback(ctx)
		return e
	}
	_, err = tx.Exec(ctx, "SELECT 1")
	if e := wantCode(err, "25P02", "a statement after a failed COPY in a transaction"); e != nil {
		tx.Rollback(ctx)
		return e
	}
	if err := tx.Rollback(ctx); err != nil {
		return err
	}
	if err := ownCopied(ctx, c, i); err != nil {
		return fmt.Errorf("after failed COPYs: %w", err)
	}
	// COPY TO cut short by statement_timeout while rows are flowing
	if _, err := c.Exec(ctx, "SET statement_timeout = '200ms'"); err != nil {
		return err
	}
	var out countingWriter
	_, err = c.PgConn().CopyTo(ctx, &out, "COPY (SELECT g, pg_sleep(0.0005) FROM generate_series(1, 1000000) g) TO STDOUT")
	if e := wantCode(err, "57014", "COPY TO past statement_timeout"); e != nil {
		return e
	}
	if _, err := c.Exec(ctx, "RESET statement_timeout"); err != nil {
		return err
	}
	var timeout string
	if err := c.QueryRow(ctx, "SHOW statement_timeout").Scan(&timeout); err != nil || timeout != "0" {
		return fmt.Errorf("statement_timeout after RESET: %q, %v", timeout, err)
	}
	return usable(ctx, c, i, "COPY TO past statement_timeout")
}

type countingWriter struct{ n int }

func (w *countingWriter) Write(p []byte) (int, error) {
	w.n += len(p)
	return len(p), nil
}

// batchFailures: a batch that fails part way is one implicit transaction, all of it undone;
// a batch with a write behind a read runs whole on the primary.
func batchFailures(ctx context.Context, c *pgx.Conn, i int) error {
	insert := "INSERT INTO " + items + " (c, k, v) VALUES ($1, $2, $3)"
	for _, failAt := range []int{1, 2, 3} {
		b := &pgx.Batch{}
		b.Queue("SELECT count(*) FROM "+items+" WHERE c = $1", i)
		queued := 1
		for q := 1; q <= 4; q++ {
			if q == failAt {
				b.Queue("SELECT 10 / $1::int", 0)
			} else {
				b.Queue(insert, i, 400+q, "batch failure")
			}
			queued++
		}
		br := c.SendBatch(ctx, b)
		var n int
		if err := br.QueryRow().Scan(&n); err != nil || n != itemsPerClient {
			br.Close()
			return fmt.Errorf("count ahead of a failing batch: %d, %v", n, err)
		}
		var failed error
		for q := 1; q < queued; q++ {
			if _, err := br.Exec(); err != nil && failed == nil {
				failed = err
			}
		}
		br.Close()
		if e := wantCode(failed, "22012", fmt.Sprintf("a batch failing at %d", failAt)); e != nil {
			return e
		}
		if n, err := countOwn(ctx, c, i); err != nil || n != itemsPerClient {
			return fmt.Errorf("after a batch failing at %d: %d own rows, %v", failAt, n, err)
		}
	}
	// reads ahead of a write and a read behind it: the primary runs all of it
	b := &pgx.Batch{}
	b.Queue("SELECT $1::int", i)
	b.Queue(insert+" RETURNING pg_is_in_recovery()", i, 500, "batch write")
	b.Queue("DELETE FROM "+items+" WHERE c = $1 AND k = $2", i, 500)
	b.Queue("SELECT pg_is_in_recovery()")
	br := c.SendBatch(ctx, b)
	var got int
	var replica, replica2 bool
	if err := br.QueryRow().Scan(&got); err != nil || got != i {
		br.Close()
		return fmt.Errorf("read ahead of a write in a batch: %d, %v", got, err)
	}
	if err := br.QueryRow().Scan(&replica); err != nil || replica {
		br.Close()
		return fmt.Errorf("write in a batch on a replica (%v), %v", replica, err)
	}
	if tag, err := br.Exec(); err != nil || tag.String() != "DELETE 1" {
		br.Close()
		return fmt.Errorf("delete in a batch: %q, %v", tag, err)
	}
	if err := br.QueryRow().Scan(&replica2); err != nil || replica2 {
		br.Close()
		return fmt.Errorf("read behind a write in a batch on a replica (%v), %v", replica2, err)
	}
	if err := br.Close(); err != nil {
		return err
	}
	// a failed transaction rolled back; reads and writes after it go where they belong
	tx, err := c.Begin(ctx)
	if err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, insert, i, 501, "rolled back"); err != nil {
		return err
	}
	_, err = tx.Exec(ctx, insert, i, 0, "dup")
	if e := wantCode(err, "23505", "a duplicate in a transaction"); e != nil {
		tx.Rollback(ctx)
		return e
	}
	if err := tx.Rollback(ctx); err != nil {
		return err
	}
	var onReplica bool
	if err := c.QueryRow(ctx, insert+" RETURNING pg_is_in_recovery()", i, 502, "after").Scan(&onReplica); err != nil || onReplica {
		return fmt.Errorf("a write after a failed transaction: on a replica %v, %v", onReplica, err)
	}
	if _, err := c.Exec(ctx, "DELETE FROM "+items+" WHERE c = $1 AND k = $2", i, 502); err != nil {
		return err
	}
	if n, err := countOwn(ctx, c, i); err != nil || n != itemsPerClient {
		return fmt.Errorf("after batch failures: %d own rows, %v", n, err)
	}
	return nil
}

// cancelUntilDone sends CancelRequests until run returns: the statement may not have reached
// its server when one arrives.
func cancelUntilDone(ctx context.Context, c *pgx.Conn, run func() error) error {
	done := make(chan error, 1)
	go func() { done <- run() }()
	deadline := time.After(waitLimit)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case err := <-done:
			return err
		case <-tick.C:
			if err := c.PgConn().CancelRequest(ctx); err != nil {
				return fmt.Errorf("cancel request: %w", err)
			}
		case <-deadline:
			return errors.New("the cancel did not end the statement")
		}
	}
}

// cancelsAndTimeouts: pgx's CancelRequest and statement_timeout end a read (a replica's,
// when reads are split) and a COPY TO; the connection is usable after each.
func cancelsAndTimeouts(ctx context.Context, c *pgx.Conn, i int) error {
	err := cancelUntilDone(ctx, c, func() error {
		var x string
		return c.QueryRow(ctx, "SELECT pg_sleep(60)::text").Scan(&x)
	})
	if e := wantCode(err, "57014", "a cancelled read"); e != nil {
		return e
	}
	if err := usable(ctx, c, i, "a cancelled read"); err != nil {
		return err
	}
	err = cancelUntilDone(ctx, c, func() error {
		_, err := c.PgConn().CopyTo(ctx, io.Discard, "COPY (SELECT g, pg_sleep(0.001) FROM generate_series(1, 100000) g) TO STDOUT")
		return err
	})
	if e := wantCode(err, "57014", "a cancelled COPY TO"); e != nil {
		return e
	}
	if err := usable(ctx, c, i, "a cancelled COPY TO"); err != nil {
		return err
	}
	if _, err := c.Exec(ctx, "SET statement_timeout = '100ms'"); err != nil {
		return err
	}
	var x string
	err = c.QueryRow(ctx, "SELECT pg_sleep(60)::text").Scan(&x)
	if e := wantCode(err, "57014", "a read past statement_timeout"); e != nil {
		return e
	}
	if _, err := c.Exec(ctx, "RESET statement_timeout"); err != nil {
		return err
	}
	return usable(ctx, c, i, "a read past statement_timeout")
}

// abandoned: pgx closes its connection mid-statement when the context ends (after a
// CancelRequest and a Terminate), or when COPY TO's writer fails: on connections of their
// own, each statement marked pgx_abandoned so tests/drivers.rs can check that none is left
// running on any server.
func abandoned(ctx context.Context, cfg *pgx.ConnConfig, i int) error {
	type attempt struct {
		what string
		run  func(context.Context, *pgx.Conn) error
	}
	attempts := []attempt{
		{"a read past its context's deadline", func(ctx context.Context, c *pgx.Conn) error {
			var x string
			return c.QueryRow(ctx, "SELECT pg_sleep(15)::text /* pgx_abandoned */").Scan(&x)
		}},
		{"a statement on the primary past its context's deadline", func(ctx context.Context, c *pgx.Conn) error {
			_, err := c.Exec(ctx, "SELECT pg_sleep(15), $1::int /* pgmux:primary */ /* pgx_abandoned */", i)
			return err
		}},
		{"a COPY FROM past its context's deadline", func(ctx context.Context, c *pgx.Conn) error {
			src := &copyRowsSource{i: i, badAt: -1, failAt: -1, endless: true}
			_, err := c.CopyFrom(ctx, pgx.Identifier{copyT}, []string{"c", "n", "s"}, src)
			return err
		}},
		{"a COPY TO whose writer fails half way", func(ctx context.Context, c *pgx.Conn) error {
			_, err := c.PgConn().CopyTo(ctx, &failingWriter{after: 100000},
				"COPY (SELECT g, repeat('x', 20) FROM generate_series(1, 2000000) g) TO STDOUT /* pgx_abandoned */")
			return err
		}},
	}
	for _, a := range attempts {
		c, err := pgx.ConnectConfig(ctx, cfg)
		if err != nil {
			return fmt.Errorf("connect: %w", err)
		}
		short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		if a.what == "a COPY TO whose writer fails half way" {
			short = ctx
		}
		err = a.run(short, c)
		cancel()
		if err == nil {
			c.Close(ctx)
			return fmt.Errorf("%s: no error", a.what)
		}
		if !c.IsClosed() {
			// the deadline passed before pgx sent anything (its connection is then safe to
			// keep): it must still work
			err = usable(ctx, c, i, a.what)
			c.Close(ctx)
			if err != nil {
				return err
			}
			continue
		}
		<-c.PgConn().CleanupDone()
	}
	return nil
}

type failingWriter struct{ n, after int }

func (w *failingWriter) Write(p []byte) (int, error) {
	w.n += len(p)
	if w.n > w.after {
		return 0, errors.New("the writer gives up")
	}
	return len(p), nil
}
