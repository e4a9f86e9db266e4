"""The public fakes of L{twisted_criu.testing.fakes} provide their interfaces."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from twisted_criu.interfaces import ILocalImageService, IRemoteImageSink, IStoredImage
from twisted_criu.storage.memory import MemoryStore
from twisted_criu.testing.fakes import FakeLocalService, FakeSink, storedImage


class InterfaceTests(SynchronousTestCase):
    def test_fakeLocalService(self) -> None:
        self.assertTrue(verifyObject(ILocalImageService, FakeLocalService()))

    def test_fakeSink(self) -> None:
        self.assertTrue(verifyObject(IRemoteImageSink, FakeSink()))

    def test_storedImage(self) -> None:
        image = storedImage(MemoryStore(), b"image bytes")
        self.assertTrue(verifyObject(IStoredImage, image))
        self.assertEqual(image.size, 11)
