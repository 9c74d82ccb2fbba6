-- The example's business tables, in the database Sluice lives in (or point Sluice's
-- DATABASE_URL at this application's database). Needs Sluice's schema (revision 0005 or
-- later: `sluice migrate`) and a topic named `orders`.

CREATE TABLE IF NOT EXISTS orders (
    id         bigserial PRIMARY KEY,
    customer   text NOT NULL,
    total      numeric(12, 2) NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- What the consumer produces: one invoice per order. No unique constraint on purpose, so an
-- order applied twice would show up as two rows instead of being hidden by an error.
CREATE TABLE IF NOT EXISTS invoices (
    id         bigserial PRIMARY KEY,
    order_id   bigint NOT NULL,
    amount     numeric(12, 2) NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Every order inserted publishes an event in the same transaction: a rolled-back order is
-- never announced, a committed one always is. The dedup id makes a retried insert of the
-- same order id harmless downstream.
CREATE OR REPLACE FUNCTION orders_publish() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM sluice.send(
        'orders',
        jsonb_build_object('order_id', NEW.id, 'customer', NEW.customer, 'total', NEW.total),
        p_key => NEW.customer,
        p_dedup_id => 'order-' || NEW.id);
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS orders_publish ON orders;
CREATE TRIGGER orders_publish AFTER INSERT ON orders
    FOR EACH ROW EXECUTE FUNCTION orders_publish();
