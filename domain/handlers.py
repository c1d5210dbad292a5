"""Command handlers: load, call one aggregate method, save. No rules here."""

from __future__ import annotations

from domain.aggregates import Order
from domain.commands import CancelOrder, CreateOrder, RestockProduct
from domain.ids import new_uuid
from domain.ports import RecordedEvent
from domain.unit_of_work import UnitOfWork


async def create_order(command: CreateOrder, uow: UnitOfWork) -> list[RecordedEvent]:
    async with uow:
        products = await uow.products(item.product_id for item in command.items)
        order = Order.place(
            order_id=new_uuid(),
            customer_id=command.customer_id,
            items=command.items,
            shipping_address=command.shipping_address,
            created_by=command.user_id,
            products=products,
        )
        return await uow.commit([order, *(products[i.product_id] for i in command.items)])


async def cancel_order(command: CancelOrder, uow: UnitOfWork) -> list[RecordedEvent]:
    async with uow:
        order = await uow.order(command.order_id)
        products = await uow.products(item.product_id for item in order.items)
        order.cancel(command.reason, command.user_id, command.by_admin, products)
        return await uow.commit([order, *(products[i.product_id] for i in order.items)])


async def restock_product(command: RestockProduct, uow: UnitOfWork) -> list[RecordedEvent]:
    async with uow:
        product = (await uow.products([command.product_id]))[command.product_id]
        product.restock(command.quantity)
        return await uow.commit([product])
